"""MPT through ahfa: its attention (fused QKV with optional clipping, ALiBi, scaled scores, dropout) becomes one
``hf_ahfa`` call with ``alibi_slopes``.

MPT builds ``MptAttention`` directly and its model turns the causal mask into a bool tensor
(``create_causal_mask(...).to(torch.bool)``, True = masked, as its eager mask reads). ``apply`` puts, in
Transformers' MPT module, (1) a subclass of ``MptAttention`` that runs ``hf_ahfa`` where the model asked for
it, and (2) a ``create_causal_mask`` that, for such models only, hands on ahfa's own mask (a bool visibility
mask, or a marker tensor where none is needed, so that unpadded calls run causal without a dense mask),
(3) a check in ``MptModel.forward`` that refuses ``output_attentions`` for them; ``revert`` puts the
originals back. The ALiBi slopes are read from the bias MPT passes (its last two columns:
``0`` and ``-slope``), so they are MPT's whatever its release computes. MPT adds ``slope * (key index - last
key index)`` to the scores; ahfa adds ``-slope * (query position - key position)``: the same softmax for
every query (a per-row constant apart). Not supported: attention weights (``output_attentions=True`` raises).
"""

from __future__ import annotations

import functools

import torch

MODEL_TYPE = "mpt"
_ORIGINAL: dict = {}
# Where ahfa needs no mask (no padding): a marker that survives MPT's ``.to(torch.bool)`` (a bool tensor's
# ``.to(torch.bool)`` is the tensor itself) and that the attention below reads as "no mask"
_NO_MASK = torch.ones(0, dtype=torch.bool)


def _module():
    from transformers.models.mpt import modeling_mpt

    return modeling_mpt


def _is_ahfa(config) -> bool:
    return getattr(config, "_attn_implementation", None) == "ahfa"


def _mask_function(original):
    @functools.wraps(original)
    def create_causal_mask(*args, **kwargs):
        mask = original(*args, **kwargs)
        config = kwargs.get("config", args[0] if args else None)
        if not _is_ahfa(config):
            return mask
        return _NO_MASK if mask is None else mask

    return create_causal_mask


def _model_forward(original):
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        # MPT collects the weights its attention returns; ahfa's are not computed
        wanted = kwargs.get("output_attentions")
        if _is_ahfa(self.config) and (self.config.output_attentions if wanted is None else wanted):
            raise ValueError("MPT with attn_implementation='ahfa' does not return attention weights; load it "
                             "with attn_implementation='eager' for output_attentions=True")
        return original(self, *args, **kwargs)

    return forward


def _attention_class(base):
    class MptAhfaAttention(base):
        """MPT attention computed by ``hf_ahfa`` where the model asked for it (same parameters as MPT's)."""

        def __init__(self, config, layer_idx=None):
            super().__init__(config, layer_idx)
            self.ahfa = _is_ahfa(config)
            self.config = config  # ahfa_attention_forward reads the stored policy (config.ahfa) from it

        def forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
            # Transformers <= 5.24 call the cache past_key_values
            cache = kwargs.pop("past_key_values", cache)
            if not self.ahfa:
                return super().forward(hidden_states, position_bias, cache, attention_mask=attention_mask, **kwargs)
            from hf_ahfa.integration import ahfa_attention_forward

            if position_bias is None or position_bias.shape[-1] < 2:
                raise ValueError("MPT with attn_implementation='ahfa' needs its ALiBi bias over at least two "
                                 "positions (config.max_seq_len >= 2)")
            B, T, _ = hidden_states.shape
            qkv = self.Wqkv(hidden_states)
            if self.clip_qkv:
                qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
            query, key, value = (x.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, 2))
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
            out, _ = ahfa_attention_forward(
                self, query, key, value, None if attention_mask is _NO_MASK else attention_mask,
                scaling=self.softmax_scale, dropout=self.attn_dropout_p if self.training else 0.0,
                alibi_slopes=-position_bias[:, 0, -2].float(),
            )
            return self.out_proj(out.reshape(B, T, self.hidden_size)), None

    return MptAhfaAttention


def apply(config=None) -> None:
    """Make MPT models built with ``attn_implementation="ahfa"`` compute attention with ``hf_ahfa``."""
    module = _module()
    if "MptAttention" not in _ORIGINAL:
        _ORIGINAL["MptAttention"] = module.MptAttention
        _ORIGINAL["create_causal_mask"] = module.create_causal_mask
        module.MptAttention = _attention_class(module.MptAttention)
        module.create_causal_mask = _mask_function(module.create_causal_mask)
        _ORIGINAL["MptModel.forward"] = module.MptModel.forward
        module.MptModel.forward = _model_forward(module.MptModel.forward)


def revert() -> None:
    """Undo ``apply`` (models built since keep their attention modules)."""
    module = _module()
    for name in ("MptAttention", "create_causal_mask"):
        if name in _ORIGINAL:
            setattr(module, name, _ORIGINAL.pop(name))
    if "MptModel.forward" in _ORIGINAL:
        module.MptModel.forward = _ORIGINAL.pop("MptModel.forward")
