"""A causal LM's training loss without its full logits (``ahfa-eval train --loss-chunk``).

A window of L tokens has ``L x vocab`` logits: for Gemma-3 (262K-token vocabulary) at 32K tokens that is 34 GB in
float32, twice with its gradient, more than the model, the LoRA and the attention together. Here the decoder's last
hidden states go through the output head ``chunk`` positions at a time, each chunk's logits recomputed in the
backward (``torch.utils.checkpoint``) instead of kept: ``O(chunk x vocab)`` memory. The loss is Transformers'
``ForCausalLMLoss`` (float32 cross-entropy of position t's logits against token t + 1, -100 ignored, the sum over
``num_items_in_batch`` where the Trainer passes it, else the mean).

Only models whose logits are ``lm_head(hidden)`` (with ``config.final_logit_softcapping`` where set) can be computed
this way; ``check_head`` compares against the model's own loss once and refuses the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def causal_lm_parts(model):
    """``(decoder, head, softcap)`` of a causal LM (a peft model is looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return base.get_decoder(), base.get_output_embeddings(), softcap


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, softcap: float | None,
                    chunk: int, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The next-token loss of ``head(hidden)``: ``hidden (B, L, H)``, ``labels (B, L)`` (``-100``: not scored),
    ``chunk`` positions at a time. A scalar: the summed loss over ``num_items_in_batch`` if given, else the mean over
    the scored positions."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    hidden, targets = hidden[:, :-1], labels[:, 1:]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_chunk_nll, hidden[:, part], targets[:, part], head, softcap, use_reentrant=False)
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    return total / num_items_in_batch


def compute_loss(model, inputs: dict, chunk: int, num_items_in_batch=None) -> torch.Tensor:
    """``chunked_lm_loss`` of ``model`` on Trainer ``inputs`` (``input_ids``, ``labels``, optionally
    ``attention_mask``)."""
    decoder, head, softcap = causal_lm_parts(model)
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = decoder(**kwargs, use_cache=False).last_hidden_state
    return chunked_lm_loss(hidden, inputs["labels"], head, softcap, chunk, num_items_in_batch)


def check_head(model, ids: torch.Tensor, chunk: int) -> None:
    """Raise ``ValueError`` unless ``compute_loss`` gives the model's own loss on ``ids (1, L)`` (float32, no
    autocast; a few positions suffice): models that scale or otherwise change their logits beyond ``lm_head`` and
    the final softcap would train on another loss."""
    inputs = {"input_ids": ids, "labels": ids}
    with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
        own = model(**inputs, use_cache=False).loss
        ours = compute_loss(model, inputs, chunk)
    if not torch.allclose(ours, own, rtol=1e-4, atol=1e-5):
        raise ValueError(f"the loss from {type(model).__name__}'s output head taken in chunks ({ours.item():.6f}) is "
                         f"not the model's own ({own.item():.6f}): its logits are more than lm_head(hidden) and "
                         "final_logit_softcapping")
