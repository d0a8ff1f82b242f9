"""The call spec: one validated, normalised description of an attention call, built once per call.

``hf_ahfa.attention`` and the Transformers function build an ``AttnCall`` with ``make_call`` and pass it
down; every backend reads its arguments from it, and ``kernel_args`` is the one place where it becomes the
Triton ops' flat arguments (window ``-1`` sentinel, softcap ``0.0`` for none).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hf_ahfa import checks
from hf_ahfa.masks import hides_no_key, normalize_window


@dataclass(frozen=True)
class AttnCall:
    """What an attention call computes, apart from q, k, v themselves.

    Attributes:
        causal: bottom-right aligned causal mask.
        window: ``(left, right)`` visible offsets around each query's position, or ``None`` (unbounded);
            ``right`` is 0 when ``causal``.
        scale: score scale (already defaulted to ``D ** -0.5``).
        softcap: ``c`` in ``c * tanh(s / c)``, or ``None``.
        sinks: ``(Hq,)`` sink logits, or ``None``.
        dropout_p: dropout on the probabilities.
        key_padding_mask: ``(B, K)`` bool, or ``None``.
        attn_mask: ``(B|1, Hq|1, Q, K)`` bool, or ``None``.
        cu_seqlens: ``(cu_q, cu_k)`` int64 contiguous offsets of a packed batch, or ``None``.
        max_q, max_k: the longest query / key sequence (the whole lengths when not packed).
        alibi: ``(Hq,)`` or ``(B, Hq)`` float32 contiguous ALiBi slopes (``B``: sequences when packed), or
            ``None``: ``-slope * |i + K - Q - j|`` is added to the score of query ``i`` and key ``j``.
    """

    causal: bool
    window: tuple[int, int] | None
    scale: float
    softcap: float | None
    sinks: torch.Tensor | None
    dropout_p: float
    key_padding_mask: torch.Tensor | None
    attn_mask: torch.Tensor | None
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None
    max_q: int
    max_k: int
    alibi: torch.Tensor | None = None

    @property
    def element_masks(self) -> bool:
        """True when some visibility comes from a tensor (no tile is known to be fully visible)."""
        return self.key_padding_mask is not None or self.attn_mask is not None

    def needs_grad(self, q, k, v) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, self.sinks) if t is not None)

    def replace(self, **changes) -> AttnCall:
        return dataclasses.replace(self, **changes)

    def dropout_seed(self) -> int:
        """The kernels' dropout seed, drawn from torch's RNG so that activation checkpointing (which restores
        the RNG state) replays the same mask; 0 without dropout."""
        return int(torch.randint(0, 2**30, ())) if self.dropout_p > 0 else 0

    def kernel_args(self) -> dict:
        """The Triton ops' encoding of this call's semantics (no window: ``-1``; no softcap: ``0.0``)."""
        left, right = self.window if self.window is not None else (-1, -1)
        return dict(causal=self.causal, win_left=left, win_right=right, softcap=self.softcap or 0.0,
                    scale=self.scale)


def make_call(q, k, v, *, causal=False, window=None, softcap=None, sinks=None, dropout_p=0.0, scale=None,
              key_padding_mask=None, attn_mask=None, cu_seqlens=None, max_seqlens=None, alibi_slopes=None,
              check_values=True) -> AttnCall:
    """Validate the arguments of ``hf_ahfa.attention`` (errors name the argument) and normalise them.

    ``max_seqlens``: ``(max_q, max_k)`` of a packed batch when the caller knows them (Transformers does),
    so that nothing waits for the GPU. ``check_values=False`` skips the checks that read tensor values
    (NaN sinks, offsets that do not add up), for callers whose tensors are valid by construction.
    """
    checks.check_qkv(q, k, v)
    checks.check_flag("causal", causal)
    checks.check_window(window)
    checks.check_scalars(softcap, dropout_p, scale)
    checks.check_sinks(sinks, q, check_values)
    checks.check_masks(key_padding_mask, attn_mask, q, k)
    cu = checks.check_cu_seqlens(cu_seqlens, q, k)
    checks.check_alibi(alibi_slopes, q, cu)
    max_q, max_k = q.shape[1], k.shape[1]
    if cu is not None:
        if max_seqlens is None or check_values:
            checked = checks.check_cu_values(cu, q, k)  # one host sync: also yields the longest sequences
            max_seqlens = max_seqlens or checked
        max_q, max_k = (int(m) for m in max_seqlens)
    return AttnCall(
        causal=causal, window=_call_window(window, causal, max_q, max_k),
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        # the kernels read sinks with stride 1 (a copy keeps the gradient flowing to a strided view)
        softcap=None if softcap is None else float(softcap), sinks=None if sinks is None else sinks.contiguous(),
        dropout_p=float(dropout_p),
        key_padding_mask=key_padding_mask, attn_mask=attn_mask, cu_seqlens=cu, max_q=max_q, max_k=max_k,
        alibi=None if alibi_slopes is None else alibi_slopes.float().contiguous(),
    )


def _call_window(window, causal: bool, max_q: int, max_k: int) -> tuple[int, int] | None:
    """``AttnCall.window`` of a checked ``window`` argument."""
    window = normalize_window(window, causal)
    if window is None or hides_no_key(window, causal, max_q, max_k):
        return None  # the call routes as plain attention (SDPA where it is faster)
    # a window wider than every distance between a query and a key is no narrower than that distance: the
    # kernels' 32-bit positions never see a larger one
    reach = max_q + max_k
    return (min(window[0], reach), min(window[1], reach))


def plain_call(q_len: int, k_len: int, head_dim: int, *, causal: bool, window, scale, softcap=None,
               sinks=None) -> AttnCall:
    """``make_call(q, k, v, causal=causal, window=window, scale=scale, softcap=softcap, sinks=sinks)`` without its
    checks, for a call whose checked properties (dtypes, devices, shapes, argument values) an earlier call of the
    same kind passed: the router's memo of plain calls (``router.run_plain``)."""
    return AttnCall(causal=causal, window=_call_window(window, causal, q_len, k_len),
                    scale=head_dim ** -0.5 if scale is None else float(scale),
                    softcap=None if softcap is None else float(softcap),
                    sinks=None if sinks is None else sinks.contiguous(),
                    dropout_p=0.0, key_padding_mask=None, attn_mask=None, cu_seqlens=None, max_q=q_len, max_k=k_len)
