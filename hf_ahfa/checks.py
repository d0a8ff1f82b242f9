"""Argument validation for ``hf_ahfa.attention``: every error names the argument and what was expected."""

from __future__ import annotations

import math
from numbers import Real

import torch

MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq_len, heads, head_dim), got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type == "meta":
        raise ValueError("q, k, v are meta tensors, which hold no data to attend over; use a real device "
                         "(torch.compile's fake tensors are fine)")
    (B, _, Hq, D), (Bk, K, Hkv, Dk), (Bv, Kv, Hv, Dv) = q.shape, k.shape, v.shape
    if not B == Bk == Bv:
        raise ValueError(f"q, k, v must have the same batch size (dim 0), got {B}, {Bk}, {Bv}")
    if K != Kv:
        raise ValueError(f"k and v must have the same sequence length (dim 1), got {K} and {Kv}")
    if Hkv != Hv:
        raise ValueError(f"k and v must have the same number of heads (dim 2), got {Hkv} and {Hv}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k/v's heads ({Hkv}) for GQA/MQA")
    if D != Dk:
        raise ValueError(f"q and k must have the same head_dim (dim 3), got {D} and {Dk}")
    for name, d in (("q/k", D), ("v", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    # float and int first: the per-call path (Real is an ABC, slow to test against)
    return type(x) in (float, int) or (isinstance(x, Real) and not isinstance(x, bool))


def check_window(window) -> None:
    if window is None:
        return
    if _is_int(window):
        if window < 1:
            raise ValueError(f"window must be >= 1 (Transformers' sliding_window), got {window}")
        return
    if isinstance(window, (tuple, list)) and len(window) == 2 and all(_is_int(w) for w in window):
        if min(window) < 0:
            raise ValueError(f"window=(left, right) must be non-negative, got {tuple(window)}")
        return
    raise TypeError(f"window must be None, an int or a (left, right) pair of ints, got {window!r}")


def check_scalars(softcap, dropout_p, scale) -> None:
    if softcap is not None and not (_is_real(softcap) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite positive number, got {softcap!r}")
    if not (_is_real(dropout_p) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is not None and not (_is_real(scale) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be None or a finite positive number, got {scale!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_sinks(sinks, q, check_values: bool = True) -> None:
    if sinks is None:
        return
    Hq = q.shape[2]
    if not isinstance(sinks, torch.Tensor) or sinks.shape != (Hq,) or not sinks.is_floating_point():
        got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"sinks must be a floating tensor of shape (num_q_heads,) = ({Hq},), got {got}")
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")
    # reads the values (a host sync): skipped for model weights and while torch.compile traces
    if check_values and not torch.compiler.is_compiling() and torch.isnan(sinks).any():
        raise ValueError("sinks contains NaN")


def check_alibi(slopes, q, cu) -> None:
    """ALiBi slopes: a floating ``(Hq,)`` or ``(B, Hq)`` tensor on q's device (``B``: the sequences when packed)."""
    if slopes is None:
        return
    Hq = q.shape[2]
    rows = q.shape[0] if cu is None else cu[0].numel() - 1
    if not isinstance(slopes, torch.Tensor) or not slopes.is_floating_point() \
            or tuple(slopes.shape) not in ((Hq,), (rows, Hq)):
        got = tuple(slopes.shape) if isinstance(slopes, torch.Tensor) else type(slopes).__name__
        raise ValueError(f"alibi_slopes must be a floating tensor of shape (num_q_heads,) = ({Hq},) or "
                         f"(batch, num_q_heads) = ({rows}, {Hq}), got {got}")
    if slopes.device != q.device:
        raise ValueError(f"alibi_slopes must be on q's device {q.device}, got {slopes.device}")


def check_masks(key_padding_mask, attn_mask, q, k) -> None:
    B, Q, Hq, _ = q.shape
    K = k.shape[1]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = attend)")
        if key_padding_mask.shape != (B, K):
            raise ValueError(f"key_padding_mask must have shape (batch, k_len) = ({B}, {K}), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
            raise TypeError("attn_mask must be a bool tensor (True = attend)")
        shape = tuple(attn_mask.shape)
        if len(shape) != 4 or shape[0] not in (1, B) or shape[1] not in (1, Hq) or shape[2:] != (Q, K):
            raise ValueError(f"attn_mask must have shape ({B} or 1, {Hq} or 1, {Q}, {K}), got {shape}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")


def check_cu_seqlens(cu_seqlens, q, k) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Checks the form of ``cu_seqlens`` (one tensor, or a ``(cu_q, cu_k)`` pair) without reading its values;
    returns ``(cu_q, cu_k)`` as contiguous int64 tensors (the kernels read them with stride 1)."""
    if cu_seqlens is None:
        return None
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got batch size {q.shape[0]}")
    pair = tuple(cu_seqlens) if isinstance(cu_seqlens, (tuple, list)) else (cu_seqlens, cu_seqlens)
    if len(pair) != 2:
        raise ValueError("cu_seqlens must be a tensor or a (cu_seqlens_q, cu_seqlens_k) pair")
    for name, cu in (("cu_seqlens (q)", pair[0]), ("cu_seqlens (k)", pair[1])):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a 1-D int32/int64 tensor")
        if cu.numel() < 2:
            raise ValueError(f"{name} must hold at least 2 offsets, got {cu.numel()}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    if pair[0].numel() != pair[1].numel():
        raise ValueError("cu_seqlens for q and k must describe the same number of sequences")
    return pair[0].long().contiguous(), pair[1].long().contiguous()


def check_cu_values(cu: tuple[torch.Tensor, torch.Tensor], q, k) -> tuple[int, int]:
    """Checks the offsets' values (one host sync) and returns the longest query and key sequence."""
    longest = []
    for name, c, total in (("cu_seqlens (q)", cu[0], q.shape[1]), ("cu_seqlens (k)", cu[1], k.shape[1])):
        values = c.tolist()
        if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must start at 0 and be non-decreasing, got {values}")
        if values[-1] != total:
            raise ValueError(f"{name} must end at the packed length {total}, got {values[-1]}")
        longest.append(max(b - a for a, b in zip(values, values[1:])))
    return longest[0], longest[1]


def check_layout(layout, q, call, policy) -> None:
    """``layout`` must be a BlockLayout over this call's batch rows (or packed sequences) and heads."""
    from hf_ahfa.block_layout import BlockLayout

    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a hf_ahfa.BlockLayout, got {type(layout).__name__}")
    if policy is not None or call.attn_mask is not None:
        raise ValueError("layout cannot be combined with policy or attn_mask (it already says what is computed)")
    rows = q.shape[0] if call.cu_seqlens is None else call.cu_seqlens[0].numel() - 1
    q_len, k_len = call.max_q, call.max_k
    if not (_is_int(layout.block_q) and _is_int(layout.block_k) and layout.block_q > 0 and layout.block_k > 0):
        raise ValueError(f"layout block sizes must be positive ints, got {layout.block_q!r}x{layout.block_k!r}")
    B, H, NQ, NK = layout.shape
    want = (rows, q.shape[2], -(-q_len // layout.block_q), -(-k_len // layout.block_k))
    if (B, H, NQ, NK) != want or (layout.q_len, layout.k_len) != (q_len, k_len):
        raise ValueError(f"layout must have shape (batch or sequences, q heads, query blocks, key blocks) = {want} "
                         f"for q_len={q_len}, k_len={k_len}; got {(B, H, NQ, NK)} for q_len={layout.q_len}, "
                         f"k_len={layout.k_len}")
    if layout.kv_count.device != q.device:
        raise ValueError(f"layout must be on q's device {q.device}, got {layout.kv_count.device}")
    for name in ("kv", "full"):
        count, index = getattr(layout, f"{name}_count"), getattr(layout, f"{name}_index")
        if count is None:
            continue
        if count.shape != (B, H, NQ) or index.shape != (B, H, NQ, NK) or count.dtype != torch.int32 \
                or index.dtype != torch.int32:
            raise ValueError(f"layout.{name}_count / {name}_index must be int32 of shapes {(B, H, NQ)} / "
                             f"{(B, H, NQ, NK)}, got {count.dtype} {tuple(count.shape)} / {index.dtype} "
                             f"{tuple(index.shape)} (build layouts with BlockLayout.from_dense)")
        # a user's layout only (one host sync): an index out of range would read outside the tensors
        used = torch.arange(NK, device=count.device) < count[..., None]
        if bool(((count < 0) | (count > NK)).any()) or bool((used & ((index < 0) | (index >= NK))).any()):
            raise ValueError(f"layout.{name}_count must lie in [0, {NK}] and its first {name}_count entries of "
                             f"{name}_index in [0, {NK})")


def check_policy(policy) -> None:
    from hf_ahfa.policy import AdaptivePolicy

    if policy is not None and not isinstance(policy, AdaptivePolicy):
        raise TypeError(f"policy must be a hf_ahfa.AdaptivePolicy or None, got {type(policy).__name__} "
                        "(build one with hf_ahfa.AdaptivePolicy(**fields))")
