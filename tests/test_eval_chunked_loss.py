"""``hf_ahfa.eval.chunked_loss``: the loss of a causal LM taken a few positions at a time equals the model's own
(value and gradients, with and without a final softcap, padded labels, any chunk size), and models whose logits are
more than ``lm_head(hidden)`` are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from hf_ahfa.eval import chunked_loss


def _model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.5)
    config = (LlamaConfig(**common) if kind == "llama" else
              Gemma2Config(**common, final_logit_softcapping=2.0, query_pre_attn_scalar=8))
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_equals_the_models_own_loss_and_gradients(kind, chunk):
    model = _model(kind)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(chunk))
    labels = ids.clone()
    labels[1, 15:] = -100  # a padded tail: not scored
    grads = {}
    for how in ("own", "chunked"):
        model.zero_grad()
        inputs = {"input_ids": ids, "labels": labels}
        if how == "own":
            loss = model(**inputs).loss
        else:
            loss = chunked_loss.compute_loss(model, inputs, chunk)
        loss.backward()
        grads[how] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (own, own_grads), (ours, our_grads) = grads["own"], grads["chunked"]
    torch.testing.assert_close(ours, own, rtol=1e-6, atol=1e-6)
    for name, g in own_grads.items():
        # float32 sums of the same terms in another order: an element's rounding error scales with the tensor's
        # largest terms, not with the element (per-element 1e-7 failed on small elements of one CPU by ~5e-7
        # where the largest gradient was 1.55: a few ulps of it)
        torch.testing.assert_close(our_grads[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)
    if kind == "gemma2":  # the softcap is strong enough to matter: without it the loss would differ
        decoder, head, _ = chunked_loss.causal_lm_parts(model)
        with torch.no_grad():
            uncapped = chunked_loss.chunked_lm_loss(decoder(input_ids=ids).last_hidden_state, labels, head, None, chunk)
        assert not torch.allclose(uncapped, own, rtol=1e-2)
    # a given count of scored tokens (the Trainer's num_items_in_batch) divides the sum instead of the mean
    with torch.no_grad():
        n = int((labels[:, 1:] != -100).sum())
        torch.testing.assert_close(chunked_loss.compute_loss(model, {"input_ids": ids, "labels": labels}, chunk, 2 * n),
                                   own / 2, rtol=1e-6, atol=1e-6)


def test_a_head_it_cannot_reproduce_is_refused():
    model = _model("llama")
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    chunked_loss.check_head(model, ids, 4)  # Llama's logits are lm_head(hidden): accepted
    model.config.final_logit_softcapping = 0.01  # Llama does not apply it: the chunked loss would differ
    with pytest.raises(ValueError, match="not the model's own"):
        chunked_loss.check_head(model, ids, 4)
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        chunked_loss.chunked_lm_loss(torch.zeros(1, 4, 8), ids[:, :4], model.lm_head, None, 0)
