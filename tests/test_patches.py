"""Model types patched through ``hf_ahfa.patches`` (issue 14, item 2): GPT-Neo's alternating global / local
attention against its eager code on tiny random models (float32, CPU): logits of padded and unpadded batches,
generate with the model's cache, a training step's gradients; the patch is applied by from_pretrained and
reversible."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

import hf_ahfa
from hf_ahfa import patches

BACKENDS = [None, "reference", "triton"]  # routed (CPU: PyTorch's SDPA), our reference, Triton (interpreter)


def _models(window=4, dropout=0.0):
    cfg = GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       attention_types=[[["global", "local"], 1]], window_size=window, max_position_embeddings=64,
                       bos_token_id=0, eos_token_id=0, attention_dropout=dropout, resid_dropout=0.0,
                       embed_dropout=0.0)
    torch.manual_seed(0)  # separate configs: a shared one would carry the last attn_implementation to both
    eager = GPTNeoForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    ahfa = GPTNeoForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="ahfa")
    ahfa.load_state_dict(eager.state_dict())
    return eager, ahfa


def _batch(padded, side="left"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    if padded:  # left as for generation, right as for training (no label is predicted from a padded row)
        mask[0, :6] = 0 if side == "left" else 1
        mask[0, 14:] = 1 if side == "left" else 0
    return ids, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True])
def test_gpt_neo_logits_equal_eager(backend, padded, monkeypatch):
    if backend:
        monkeypatch.setenv("AHFA_BACKEND", backend)
    eager, ahfa = (m.eval() for m in _models())
    assert type(ahfa.transformer.h[1].attn.attention).__name__ == "GPTNeoAhfaAttention"
    ids, mask = _batch(padded)
    with torch.no_grad(), hf_ahfa.record() as rec:
        got = ahfa(ids, attention_mask=mask).logits
    want = eager(ids, attention_mask=mask).logits
    assert len(rec) == 2  # both layers ran through ahfa
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    # the local layer's window matters at this length: a model without it differs
    _, wide = _models(window=64)
    with torch.no_grad():
        assert (wide.eval()(ids, attention_mask=mask).logits[real] - want[real]).abs().max() > 1e-4


def test_gpt_neo_generate_equals_eager():
    eager, ahfa = (m.eval() for m in _models())
    ids, mask = _batch(padded=True)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ahfa.generate(ids, **kw), eager.generate(ids, **kw))


def test_gpt_neo_training_step_gradients_equal_eager():
    eager, ahfa = (m.train() for m in _models())
    ids, mask = _batch(padded=True, side="right")
    grads = []
    for model in (eager, ahfa):
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_gpt_neo_patch_is_reversible_and_refuses_weights():
    from transformers.models.gpt_neo import modeling_gpt_neo

    _, ahfa = _models()
    with pytest.raises(ValueError, match="does not return attention weights"):
        ahfa(_batch(False)[0], output_attentions=True)
    patches.revert("gpt_neo")
    assert "ahfa" not in modeling_gpt_neo.GPT_NEO_ATTENTION_CLASSES
    _, again = _models()  # loading with "ahfa" applies it again
    assert type(again.transformer.h[0].attn.attention).__name__ == "GPTNeoAhfaAttention"
    with pytest.raises(ValueError, match="no hf_ahfa patch for model type 'bloom'"):
        patches.revert("bloom")
