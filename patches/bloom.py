"""Bloom through ahfa: its attention (fused QKV, ALiBi, scaled scores, dropout) becomes one ``hf_ahfa`` call
with ``alibi_slopes``.

Bloom builds ``BloomAttention`` directly; ``apply`` puts a subclass in its place in Transformers' Bloom module
(used by models built with ``attn_implementation="ahfa"``; others keep Bloom's own forward), ``revert`` puts
the original back. Bloom adds ``slope * (key position among the real tokens)`` to the scores; ahfa adds
``-slope * (query position - key position)``: the same softmax for every query (a per-row constant apart),
padded keys being masked either way. Not supported: attention weights (``output_attentions=True``) and
``slow_but_exact`` tensor-parallel pretraining checkpoints (both raise).
"""

from __future__ import annotations

import math

import torch

MODEL_TYPE = "bloom"
_ORIGINAL: dict = {}


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """The ALiBi paper's head slopes ``(num_heads,)`` float32: for ``n`` a power of two, ``2 ** (-8 i / n)`` for
    ``i = 1..n``; otherwise those of the largest power of two below ``n``, then every other slope of twice
    that power for the remaining heads."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * i / n) for i in range(1, n + 1)]
    slopes += [2 ** (-4 * i / n) for i in range(1, 2 * (num_heads - n), 2)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def _module():
    from transformers.models.bloom import modeling_bloom

    return modeling_bloom


def _attention_class(base):
    class BloomAhfaAttention(base):
        """Bloom attention computed by ``hf_ahfa`` where the model asked for it (same parameters as Bloom's)."""

        def __init__(self, config, layer_idx=None):
            super().__init__(config, layer_idx)
            self.ahfa = config._attn_implementation == "ahfa"
            if self.ahfa and self.pretraining_tp > 1 and self.slow_but_exact:
                raise ValueError("Bloom with attn_implementation='ahfa' does not support slow_but_exact with "
                                 "pretraining_tp > 1; load it with attn_implementation='eager'")

        def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                    output_attentions=False, **kwargs):
            if not self.ahfa:
                return super().forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                       use_cache=use_cache, output_attentions=output_attentions, **kwargs)
            if output_attentions:
                raise ValueError("Bloom with attn_implementation='ahfa' does not return attention weights; load it "
                                 "with attn_implementation='eager' for output_attentions=True")
            from hf_ahfa.integration import ahfa_attention_forward

            B, Q, _ = hidden_states.shape
            query, key, value = self._reshape(self.query_key_value(hidden_states))  # (B, H, T, D) each
            if layer_past is not None:
                key, value = layer_past.update(key, value, self.layer_idx)
            out, _ = ahfa_attention_forward(
                self, query, key, value, attention_mask, scaling=self.inv_norm_factor,
                dropout=self.attention_dropout.p if self.training else 0.0,
                alibi_slopes=alibi_slopes(self.num_heads, query.device),
            )
            output = self.dense(out.reshape(B, Q, self.hidden_size))
            return _module().dropout_add(output, residual, self.hidden_dropout, self.training), None

    return BloomAhfaAttention


def apply(config=None) -> None:
    """Make Bloom models built with ``attn_implementation="ahfa"`` compute attention with ``hf_ahfa``."""
    module = _module()
    if "BloomAttention" not in _ORIGINAL:
        _ORIGINAL["BloomAttention"] = module.BloomAttention
        module.BloomAttention = _attention_class(module.BloomAttention)


def revert() -> None:
    """Undo ``apply`` (models built since keep their attention modules)."""
    if "BloomAttention" in _ORIGINAL:
        _module().BloomAttention = _ORIGINAL.pop("BloomAttention")
