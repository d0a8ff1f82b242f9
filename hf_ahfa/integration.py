"""Transformers registration: ``attn_implementation="ahfa"``.

Transformers calls ``ahfa_attention_forward(module, query, key, value, attention_mask, ...)`` with
``query (B, Hq, Q, D)`` and ``key/value (B, Hkv, K, D)`` views, and builds ``attention_mask`` with the
mask function registered under the same name: Transformers' own ``sdpa_mask`` (a boolean ``(B, 1, Q, K)``
mask, True = visible, that encodes causality, windows, padding, packed sequences and static-cache slots
in true cache positions, or ``None`` when the call is plainly causal/bidirectional), except that a
sliding-window layer of a plain call also gets ``None``, and a padded prefill on a GPU the padding vector alone
(see ``ahfa_mask``). A decode step's one-row mask is read as key padding.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask, sdpa_mask

try:
    from transformers.utils.output_capturing import _active_collector
except ImportError:
    _active_collector = None

from hf_ahfa import patches, telemetry
from hf_ahfa.fastest import host_may_wait
from hf_ahfa.masks import hides_no_key, make_layout, normalize_window
from hf_ahfa.policy import eager_policy_of, policy_of
from hf_ahfa.reference import reference_attention_probs
from hf_ahfa.router import plain_key, run_plain
from hf_ahfa.router import run as run_call
from hf_ahfa.spec import make_call

NAME = "ahfa"

# Keyword arguments that Transformers passes along but that do not change the attention function:
# bookkeeping for other layers, and the longest packed sequences (max_length_*, read below so that packed
# calls need no host sync).
_IGNORED_KWARGS = frozenset(
    {"position_ids", "max_length_q", "max_length_k", "use_cache", "output_hidden_states", "output_router_logits",
     "return_dict", "num_items_in_batch", "seq_idx", "cache_position", "past_key_values"}
)


# Devices whose padded prefills get the padding vector instead of the dense mask: where the router runs our
# kernels on masked calls. On the CPU masked calls go to torch's SDPA, which takes the dense mask.
COMPACT_MASK_DEVICES = frozenset({"cuda"})


def ahfa_mask(*args, **kwargs):
    """``sdpa_mask``, except for two kinds of call whose dense ``(B, 1, Q, K)`` mask the kernels need not read
    (at 32K tokens it is 1 GiB per layer, and it hides the causal structure from the kernels):

    * ``None`` for a sliding-window layer whenever a full-attention layer of the same call would get
      ``None`` (no padding, every cached key valid). The attention function applies the window from the
      ``sliding_window`` argument, which every sliding-window model passes (flash-attention needs it too).
    * On a GPU, a prefill (``Q == K > 1``) whose mask would be ``None`` but for padding (where there is none, as
      with ``generate()``'s all-ones mask: ``None``, after the same host sync as ``sdpa_mask``'s): the padding vector
      alone, ``(B, 1, 1, K)`` bool (True = a real token). The attention function reads it as a key-padding
      mask on top of the layer's causality and window; the kernels skip the causal upper triangle and the
      padded key blocks. Query rows at padded positions then see no key and give 0 (the dense mask makes them
      attend to every key); no real position's output changes.
    """
    if kwargs.get("local_size") is not None and sdpa_mask(*args, **{**kwargs, "local_size": None}) is None:
        return None
    if (padding := _padding_vector(args, kwargs)) is not None:
        return padding
    return sdpa_mask(*args, **kwargs)


def _padding_vector(args, kwargs) -> torch.Tensor | None:
    """``ahfa_mask``'s compact mask, or ``None`` where the dense mask is needed."""
    padding, q_len, kv_len = kwargs.get("attention_mask"), kwargs.get("q_length"), kwargs.get("kv_length")
    if args or padding is None or not isinstance(q_len, int) or q_len != kv_len or q_len < 2:
        return None
    if torch.device(kwargs.get("device", "cpu")).type not in COMPACT_MASK_DEVICES:
        return None
    if sdpa_mask(**{**kwargs, "attention_mask": None, "local_size": None}) is not None:
        return None  # more than padding departs from the plain pattern (packed sequences, mask overlays, ...)
    offset = kwargs.get("kv_offset", 0)
    vector = prepare_padding_mask(padding, kv_len, offset)[:, offset:offset + kv_len].bool()
    if host_may_wait() and bool(vector.all()):
        # no padding (generate()'s all-ones mask): no mask, as sdpa_mask decides with the same host sync, so that
        # the call stays on the plain path (causal SDPA, the memo) instead of a masked kernel
        return None
    return vector[:, None, None, :]


def is_padding_vector(mask: torch.Tensor | None, q_len: int, k_len: int) -> bool:
    """Whether ``mask`` is ``ahfa_mask``'s padding vector of a prefill (a dense mask of Q > 1 queries has Q rows)."""
    return (mask is not None and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1
            and q_len == k_len > 1)


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    # An additive float mask is accepted only when it is a plain 0 / -large visibility mask.
    visible = mask > torch.finfo(mask.dtype).min / 2
    if not torch.all(mask[visible] == 0):
        raise ValueError(
            "ahfa: attention_mask carries additive biases (a float mask with values other than 0 and "
            "-inf); ahfa supports boolean visibility masks only"
        )
    return visible


def _weights_requested(output_attentions: bool) -> bool:
    """True also when Transformers collects attention weights through its output hooks: some models
    (GPT-2, OPT, ...) consume ``output_attentions`` themselves and never pass it to the attention function."""
    if output_attentions:
        return True
    if _active_collector is None:  # older Transformers pass output_attentions along
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def ahfa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    output_attentions: bool = False,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Transformers attention function. Returns ``(out (B, Q, Hq, Dv) contiguous, weights or None)``.
    ``alibi_slopes``: not from Transformers (whose ALiBi models compute attention in their own code), for the
    patches of ``hf_ahfa.patches`` that route such a model here."""
    # (a set test first: the common call passes only ignored keywords, and this runs on every call)
    if not kwargs.keys() <= _IGNORED_KWARGS and (unsupported := {k: v for k, v in kwargs.items()
                                                                 if k not in _IGNORED_KWARGS and v is not None}):
        raise TypeError(
            f"ahfa attention cannot honour the keyword argument(s) {sorted(unsupported)} passed by "
            f"{type(module).__name__}; use another attn_implementation for this model"
        )
    # (the any-device test first: torch.is_autocast_enabled(device) cost a host-bound decode step ~3% on a CPU)
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(device := query.device.type):
        # As sdpa under autocast: q, k, v in autocast's dtype (mixed-precision training leaves rotated q, k in
        # float32 beside a bf16 v), and the attention's own arithmetic outside autocast
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return ahfa_attention_forward(
                module, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask, dropout, scaling, is_causal,
                sliding_window, softcap, s_aux, output_attentions, cu_seq_lens_q, cu_seq_lens_k, alibi_slopes, **kwargs)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    plain = policy = None
    if attention_mask is None:
        if sliding_window is None:  # (set by ahfa_mask's callers or the module)
            sliding_window = getattr(module, "sliding_window", None)
        if (not dropout and cu_seq_lens_q is None and alibi_slopes is None
                and not _weights_requested(output_attentions) and not torch.compiler.is_compiling()):
            # The common call: once routed, the same kind of call skips validation and routing. This runs on every
            # call of a model, where each operation costs about three times what it costs in a loop of its own
            # (a decode step's host time is what ahfa must not add to, kernels/NOTES.md).
            policy = eager_policy_of(getattr(module, "config", None))
            if policy.layers:
                policy = _layer_policy(module, key, policy)
            plain = plain_key(query, key, value, is_causal, scaling, sliding_window, policy, softcap, s_aux)
            if plain is not None and (out := run_plain(query, key, value, plain, s_aux)) is not None:
                return out.contiguous(), None
    return _routed(module, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window, softcap,
                   s_aux, output_attentions, cu_seq_lens_q, cu_seq_lens_k, alibi_slopes, kwargs, policy, plain)


def _layer_policy(module, key: torch.Tensor, policy=None):
    """The policy of the layer ``module`` for a call over ``key``'s keys (``policy``: its model's, where known)."""
    policy = policy or policy_of(getattr(module, "config", None))
    if policy.layers:  # per-layer settings (hf_ahfa.calibrate)
        policy = policy.for_layer(getattr(module, "layer_idx", None), key.shape[-2])
    return policy


def _routed(module, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window, softcap, s_aux,
            output_attentions, cu_seq_lens_q, cu_seq_lens_k, alibi_slopes, kwargs, policy, plain):
    """``ahfa_attention_forward`` past its memo: validated and routed (``plain``: the memo's key of a plain
    call, under which the router keeps its decision)."""
    Q, K = query.shape[-2], key.shape[-2]
    padded = is_padding_vector(attention_mask, Q, K)
    if padded and sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    if isinstance(sliding_window, int) and hides_no_key(normalize_window(sliding_window, is_causal and Q > 1),
                                                        is_causal and Q > 1, Q, K):
        sliding_window = None  # a window that hides no key is none (as make_call and plain_key take it)
    want_weights = _weights_requested(output_attentions)
    policy = _layer_policy(module, key, policy)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    padding = attention_mask[:, 0, 0] if padded else None
    if attention_mask is not None and not padded:
        # The mask is the truth about positions (static caches, left padding, windows): apply it alone.
        causal, window, mask = False, None, _bool_mask(attention_mask)
        if Q == 1 and mask.shape[:2] == (q.shape[0], 1):
            # one query row: its mask is the keys' visibility, a key-padding mask, whose span the decode kernel
            # reads alone (a static cache's empty tail and left padding are not read at all)
            padding, mask = mask[:, 0, 0], None
    else:
        # A skipped mask means (as in Transformers' sdpa path): a single query sees every key; otherwise
        # causal is aligned top-left, which matters only for a static cache whose tail is still empty.
        causal, window, mask = is_causal and Q > 1, sliding_window, None
        if causal and K > Q:
            k, v = k[:, :Q], v[:, :Q]
    cu_seqlens = None if cu_seq_lens_q is None else (cu_seq_lens_q, cu_seq_lens_k)
    max_lengths = (kwargs.get("max_length_q"), kwargs.get("max_length_k"))
    # the tensors come from Transformers and the model's weights: no value checks (they would wait for the GPU)
    call = make_call(q, k, v, causal=causal, window=window, softcap=softcap, sinks=s_aux, dropout_p=dropout,
                     scale=scaling, attn_mask=mask, key_padding_mask=padding, cu_seqlens=cu_seqlens,
                     alibi_slopes=alibi_slopes,
                     max_seqlens=None if None in max_lengths else max_lengths, check_values=False)
    if want_weights:
        layout = make_layout(Q, k.shape[1], q.device, *(call.cu_seqlens or (None, None)))
        out, weights = reference_attention_probs(q, k, v, layout, call)
        # keys cut off above (the empty static-cache tail) get weight 0, as in eager attention
        return out.contiguous(), torch.nn.functional.pad(weights, (0, K - weights.shape[-1]))
    layer = getattr(module, "layer_idx", None)
    if telemetry.recording():
        with telemetry.layer_tag(layer):
            return run_call(q, k, v, call, policy=policy, remember=plain, layer=layer)[0].contiguous(), None
    return run_call(q, k, v, call, policy=policy, remember=plain, layer=layer)[0].contiguous(), None


def _guard_unreachable_models(get_correct_attn_implementation):
    """Make ``attn_implementation="ahfa"`` apply the patch of a model that bypasses the AttentionInterface
    (``hf_ahfa.patches``), or raise where there is none: such a model would otherwise load and silently run
    its own attention."""

    @functools.wraps(get_correct_attn_implementation)
    def guarded(self, requested_attention, *args, **kwargs):
        model_type = getattr(self.config, "model_type", type(self).__name__)
        if (
            requested_attention == NAME
            and not getattr(self, "_supports_attention_backend", False)
            and not patches.apply(model_type, self.config)
        ):
            raise ValueError(
                f'attn_implementation="{NAME}" is not supported for model type {model_type!r} '
                f"({type(self).__name__}): it computes attention in its own code, outside Transformers' "
                "AttentionInterface, so ahfa cannot run it. Use attn_implementation=\"sdpa\" or \"eager\"."
            )
        return get_correct_attn_implementation(self, requested_attention, *args, **kwargs)

    guarded.__ahfa_guard__ = True
    return guarded


def register() -> None:
    """Register ``"ahfa"`` with Transformers' attention and attention-mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, ahfa_attention_forward)
    AttentionMaskInterface.register(NAME, ahfa_mask)
    if not getattr(PreTrainedModel.get_correct_attn_implementation, "__ahfa_guard__", False):
        PreTrainedModel.get_correct_attn_implementation = _guard_unreachable_models(
            PreTrainedModel.get_correct_attn_implementation
        )
