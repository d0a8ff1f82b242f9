"""GPT-Neo through ahfa: its self-attention's ``_attn`` (unscaled ``q k^T``, causal, every other layer a local
window of ``config.window_size`` keys) becomes one ``hf_ahfa`` call.

GPT-Neo picks its attention class from ``GPT_NEO_ATTENTION_CLASSES[config._attn_implementation]``; ``apply``
adds ``"ahfa"`` there, ``revert`` removes it. Differences from eager: the scores are computed in the model's
dtype with float32 accumulation (eager casts q and k to float32 first), and attention weights are not
returned (``output_attentions=True`` raises).
"""

from __future__ import annotations

import torch

MODEL_TYPE = "gpt_neo"


def _module():
    from transformers.models.gpt_neo import modeling_gpt_neo

    return modeling_gpt_neo


def _attention_class():
    base = _module().GPTNeoSelfAttention

    class GPTNeoAhfaAttention(base):
        """GPT-Neo self-attention computed by ``hf_ahfa`` (same parameters and state dict as eager)."""

        def forward(self, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                    output_attentions=False, **kwargs):
            if output_attentions:
                raise ValueError("GPT-Neo with attn_implementation='ahfa' does not return attention weights; "
                                 "load it with attn_implementation='eager' for output_attentions=True")
            return super().forward(hidden_states, attention_mask=attention_mask, layer_past=layer_past,
                                   use_cache=use_cache, output_attentions=False, **kwargs)

        def _attn(self, query, key, value, attention_mask=None):
            """``(B, H, T, D)`` tensors -> ``(out (B, H, Q, D), None)``."""
            from hf_ahfa.integration import _bool_mask, ahfa_attention_forward, is_padding_vector

            window = self.config.window_size if self.attention_type == "local" else None
            Q, K = query.shape[-2], key.shape[-2]
            # ahfa_mask's padding vector of a padded prefill (one row for Q == K > 1 queries) leaves the window
            # and causality to the attention; a dense mask holds causality and padding
            dense = attention_mask is not None and not is_padding_vector(attention_mask, Q, K)
            if dense and window is not None:
                # Transformers' mask holds causality and padding; the window is this layer's own rule
                pos = torch.arange(Q, device=query.device)[:, None] + (K - Q)
                near = pos - torch.arange(K, device=query.device)[None, :] < window
                attention_mask = _bool_mask(attention_mask) & near
            out, _ = ahfa_attention_forward(
                self, query, key, value, attention_mask, scaling=1.0,
                dropout=self.attn_dropout.p if self.training else 0.0,
                sliding_window=None if dense else window,
            )
            return out.transpose(1, 2), None

    return GPTNeoAhfaAttention


def apply(config=None) -> None:
    """Make ``attn_implementation="ahfa"`` build GPT-Neo's attention with ``hf_ahfa`` (idempotent)."""
    classes = _module().GPT_NEO_ATTENTION_CLASSES
    if "ahfa" not in classes:
        classes["ahfa"] = _attention_class()


def revert() -> None:
    """Undo ``apply`` (models built since keep their attention modules)."""
    _module().GPT_NEO_ATTENTION_CLASSES.pop("ahfa", None)
