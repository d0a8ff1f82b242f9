"""Model types patched through ``hf_ahfa.patches`` (issue 14, item 2): GPT-Neo (alternating global / local
layers), Bloom and MPT (ALiBi) and Falcon (rotary variants, where the release routes it through the interface) against
their eager code on tiny random models (float32, CPU): logits of padded and
unpadded batches on every backend, generate with the model's cache, a training step's gradients; the patches
are applied by from_pretrained and reversible."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM, GPTNeoConfig,
                          GPTNeoForCausalLM, MptConfig, MptForCausalLM)

import hf_ahfa
from hf_ahfa import patches

BACKENDS = [None, "reference", "triton"]  # routed, our reference, Triton (interpreter)
FAMILIES = ["gpt_neo", "bloom", "mpt"]


def _config(family, window=4, dropout=0.0):
    if family == "gpt_neo":
        return GPTNeoForCausalLM, GPTNeoConfig(
            vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, window_size=window,
            attention_types=[[["global", "local"], 1]], max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
            attention_dropout=dropout, resid_dropout=0.0, embed_dropout=0.0)
    if family == "mpt":  # 6 heads: MPT's slopes for a head count that is not a power of two; clipped q/k/v
        # (no dropout: Transformers types its attn_pdrop as int)
        return MptForCausalLM, MptConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=6, expansion_ratio=2,
                                         max_seq_len=64, attn_config={"clip_qkv": 0.5})
    return BloomForCausalLM, BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                                         attention_dropout=dropout, bos_token_id=0, eos_token_id=0)


def _models(family, **kw):
    cls, cfg = _config(family, **kw)
    torch.manual_seed(0)  # separate configs: a shared one would carry the last attn_implementation to both
    eager = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    ahfa = cls._from_config(copy.deepcopy(cfg), attn_implementation="ahfa")
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


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True])
def test_logits_equal_eager(family, backend, padded, monkeypatch):
    if backend:
        monkeypatch.setenv("AHFA_BACKEND", backend)
    eager, ahfa = (m.eval() for m in _models(family))
    ids, mask = _batch(padded)
    with torch.no_grad(), hf_ahfa.record() as rec:
        got = ahfa(ids, attention_mask=mask).logits
    want = eager(ids, attention_mask=mask).logits
    assert len(rec) == 2  # both layers ran through ahfa
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_vector_logits_equal_eager(family, backend, side, padding_vectors, monkeypatch):
    # a padded prefill with ahfa_mask's padding vector (GPUs' default) instead of the dense mask
    monkeypatch.setenv("AHFA_BACKEND", backend)
    eager, ahfa = (m.eval() for m in _models(family))
    ids, mask = _batch(True, side)
    with torch.no_grad():
        got = ahfa(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], eager(ids, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-5)
    assert padding_vectors == [(True, False, False)] * 2, padding_vectors


def test_the_patched_semantics_matter(monkeypatch):
    """GPT-Neo's local window and Bloom's ALiBi change these models' outputs: equal logits test them."""
    from hf_ahfa.patches import bloom

    ids, mask = _batch(padded=True)
    real = mask.bool()
    with torch.no_grad():
        want = _models("gpt_neo")[0].eval()(ids, attention_mask=mask).logits
        wide = _models("gpt_neo", window=64)[0].eval()(ids, attention_mask=mask).logits
        assert (wide[real] - want[real]).abs().max() > 1e-4
        eager, ahfa = (m.eval() for m in _models("bloom"))
        monkeypatch.setattr(bloom, "alibi_slopes", lambda n, device=None: torch.zeros(n, device=device))
        flat = ahfa(ids, attention_mask=mask).logits
        assert (flat[real] - eager(ids, attention_mask=mask).logits[real]).abs().max() > 1e-4
        eager = _models("mpt")[0].eval()
        want = eager(ids, attention_mask=mask).logits
        monkeypatch.setattr(type(eager.transformer), "build_mpt_alibi_tensor", lambda self, n, L, device=None:
                            torch.zeros(n, 1, L, device=device))
        assert (eager(ids, attention_mask=mask).logits[real] - want[real]).abs().max() > 1e-4


def test_mpt_runs_unpadded_calls_without_a_mask(monkeypatch):
    """MPT's model makes a bool tensor of its mask; where ahfa needs none (no padding), the patch's marker
    reaches the attention as no mask (causal from the flag, no dense Q x K mask), padded calls keep theirs."""
    from hf_ahfa import integration

    seen = []
    forward = integration.ahfa_attention_forward
    monkeypatch.setattr(integration, "ahfa_attention_forward",
                        lambda module, q, k, v, mask, **kw: seen.append(mask) or forward(module, q, k, v, mask, **kw))
    _, ahfa = _models("mpt")
    for padded in (False, True):
        ids, mask = _batch(padded)
        with torch.no_grad():
            ahfa.eval()(ids, attention_mask=mask)
    assert seen[0] is None and seen[1] is None
    assert seen[2].dtype == torch.bool and seen[2].shape == (2, 1, 20, 20)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_eager(family):
    eager, ahfa = (m.eval() for m in _models(family))
    ids, mask = _batch(padded=True)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ahfa.generate(ids, **kw), eager.generate(ids, **kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_equal_eager(family):
    eager, ahfa = (m.train() for m in _models(family))
    ids, mask = _batch(padded=True, side="right")
    grads = []
    for model in (eager, ahfa):
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_bloom_slopes_are_the_papers():
    from hf_ahfa.patches.bloom import alibi_slopes

    assert torch.equal(alibi_slopes(4), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    # 6 heads: the 4-head slopes, then the odd ones of the 8-head sequence
    assert torch.allclose(alibi_slopes(6), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]))


@pytest.mark.parametrize("family", FAMILIES)
def test_patches_are_reversible_and_refuse_weights(family):
    eager, ahfa = _models(family)
    with pytest.raises(ValueError, match="does not return attention weights"):
        ahfa(_batch(False)[0], output_attentions=True)
    eager(_batch(False)[0], output_attentions=True)  # an eager model built while patched keeps its own path
    patches.revert(family)
    _, again = _models(family)  # loading with "ahfa" applies it again
    assert any("Ahfa" in type(m).__name__ for m in again.modules())
    with pytest.raises(ValueError, match="no hf_ahfa patch for model type 'opt'"):
        patches.revert("opt")


FALCON_LAYOUTS = [dict(new_decoder_architecture=False, multi_query=True), dict(new_decoder_architecture=True,
                  num_kv_heads=2), dict(new_decoder_architecture=False, multi_query=False)]


@pytest.mark.parametrize("layout", FALCON_LAYOUTS, ids=["multi-query", "new-decoder-gqa", "multi-head"])
def test_falcon_runs_like_eager_where_the_release_allows_and_refuses_otherwise(layout):
    """Falcon's rotary variants: equal to eager (padded logits, generate) on releases whose Falcon calls the
    AttentionInterface; on earlier ones (its own attention code) loading with ahfa raises naming it; ALiBi
    Falcon (a float bias in the mask) raises at load on every release."""
    cfg = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=False,
                       bos_token_id=0, eos_token_id=0, **layout)
    with pytest.raises(ValueError, match="falcon|Falcon"):
        FalconForCausalLM._from_config(FalconConfig(**{**cfg.to_dict(), "alibi": True}), attn_implementation="ahfa")
    if not patches.apply("falcon", cfg):
        with pytest.raises(ValueError, match="'falcon'"):
            FalconForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="ahfa")
        return
    torch.manual_seed(0)
    eager = FalconForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ahfa = FalconForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="ahfa").eval()
    ahfa.load_state_dict(eager.state_dict())
    ids, mask = _batch(padded=True)
    with torch.no_grad(), hf_ahfa.record() as rec:
        got = ahfa(ids, attention_mask=mask).logits
    assert len(rec) == 2
    real = mask.bool()
    torch.testing.assert_close(got[real], eager(ids, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-5)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ahfa.generate(ids, **kw), eager.generate(ids, **kw))
