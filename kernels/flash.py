"""Launch wrappers of the dense flash kernels, and their registration as PyTorch ops.

``torch.ops.hf_ahfa.flash_fwd`` / ``flash_bwd`` are custom ops with fake (meta) implementations and
autograd, so ``torch.compile`` and activation checkpointing see one opaque op. All tensors use the
public layout ``(B, T, H, D)``; ``lse`` is ``(B, H, T)`` float32, natural log, sinks excluded.
"""

from __future__ import annotations

import torch
import triton

from hf_ahfa.kernels import configs
from hf_ahfa.kernels.flash_kernels import (
    flash_bwd_dkdv_kernel,
    flash_bwd_dq_kernel,
    flash_decode_combine_kernel,
    flash_decode_kernel,
    flash_fwd_kernel,
)
from hf_ahfa.kernels.tuning import pick

LOG2E = 1.4426950408889634


def check_supported(q: torch.Tensor) -> None:
    """Raise a clear error when these kernels cannot run a call with query ``q``."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {q.dtype}")
    if q.device.type == "cpu" and configs.interpreting():
        if q.dtype == torch.bfloat16:
            raise TypeError("bfloat16 does not run under TRITON_INTERPRET")
        return
    if q.device.type != "cuda":
        raise RuntimeError(f"the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1), got device {q.device}")
    configs.arch(q.device)  # raises below sm80


def _mask_args(key_padding_mask, attn_mask):
    """uint8 views of the bool masks (no copy) and their strides; size-1 dims broadcast with stride 0."""
    kpm = None if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    am = None if attn_mask is None else attn_mask.view(torch.uint8)
    kpm_strides = (kpm.stride(0), kpm.stride(1)) if kpm is not None else (0, 0)
    am_strides = tuple(0 if am.shape[i] == 1 else am.stride(i) for i in range(4)) if am is not None else (0, 0, 0, 0)
    return kpm, am, kpm_strides, am_strides


def _common(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    B, Q, H, D = q.shape
    K, HKV, DV = k.shape[1], k.shape[2], v.shape[3]
    varlen = cu_seqlens_q is not None
    nseq = cu_seqlens_q.numel() - 1 if varlen else B
    return dict(
        B=B, Q=Q, K=K, H=H, HKV=HKV, D=D, DV=DV, varlen=varlen, nseq=nseq,
        max_q=max_seqlen_q if varlen else Q, max_k=max_seqlen_k if varlen else K,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
        precision="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _flags(causal, win_left, win_right, softcap, dropout_p, key_padding_mask, attn_mask, varlen, precision):
    return dict(
        CAUSAL=causal, HAS_WINDOW=win_left >= 0, SOFTCAP=softcap > 0, HAS_KPM=key_padding_mask is not None,
        HAS_AM=attn_mask is not None, VARLEN=varlen, DROPOUT=dropout_p > 0, PRECISION=precision,
    )


def _sparse_args(lists, dummy):
    """Kernel arguments of a block-sparse layout's lists ``(count, index, full_count, full_index)``."""
    if lists is None:
        return (dummy, dummy, dummy, dummy, 1, 1)
    count, index, fcount, findex = lists
    return (count, index, fcount, findex, index.shape[-2], index.shape[-1])


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n``, at most ``cap``."""
    return min(n & -n, cap)


def _sparse_candidates(cands, block_q, block_k, swap=False):
    """The launch candidates with tiles shrunk where needed to split layout blocks evenly (a kernel tile
    never straddles two layout blocks). ``swap``: the dq kernel's table, whose roles are swapped."""
    fit = []
    for c in cands:
        m, n = (c[1], c[0]) if swap else (c[0], c[1])
        m, n = _pow2_divisor(block_q, m), _pow2_divisor(block_k, n)
        if min(m, n) >= 16:
            fit.append(((n, m) if swap else (m, n)) + tuple(c[2:]))
    if not fit:
        raise ValueError(f"block sizes {block_q}x{block_k} must be multiples of 16 for the block-sparse kernels")
    return list(dict.fromkeys(fit))


def run_fwd(q, k, v, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
         causal, win_left, win_right, softcap, dropout_p, seed, scale, lists=None, blocks=(1, 1)):
    c = _common(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = torch.empty(c["B"], c["Q"], c["H"], c["DV"], dtype=q.dtype, device=q.device)
    lse = torch.empty(c["B"], c["H"], c["Q"], dtype=torch.float32, device=q.device)
    kpm, am, kpm_strides, am_strides = _mask_args(key_padding_mask, attn_mask)
    dummy = out
    args = (
        q, k, v, out, lse, sinks if sinks is not None else dummy, kpm if kpm is not None else dummy,
        am if am is not None else dummy,
        cu_seqlens_q if cu_seqlens_q is not None else dummy, cu_seqlens_k if cu_seqlens_k is not None else dummy,
        *_sparse_args(lists, dummy),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *kpm_strides, *am_strides,
        c["Q"], c["K"], c["H"], c["H"] // c["HKV"], c["D"], c["DV"],
        scale * LOG2E, softcap, win_left, win_right, dropout_p, seed,
    )
    flags = _flags(causal, win_left, win_right, softcap, dropout_p, key_padding_mask, attn_mask, c["varlen"],
                   c["precision"])
    flags.update(HAS_SINKS=sinks is not None, BLOCK_D=c["BLOCK_D"], BLOCK_DV=c["BLOCK_DV"],
                 SPARSE=lists is not None, LAYOUT_BQ=blocks[0], LAYOUT_BK=blocks[1])

    def launch(cfg):
        bm, bn, warps, stages = cfg
        grid = (triton.cdiv(c["max_q"], bm), c["nseq"] * c["H"])
        flash_fwd_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)

    cands = configs.candidates(configs.FWD, q.device, c["D"])
    if lists is not None:
        cands = _sparse_candidates(cands, *blocks)
    key = ("fwd" if lists is None else f"sparse_fwd{blocks}", q.dtype, c["D"], c["DV"], c["H"] // c["HKV"], causal,
           c["max_q"] > 1024, c["max_k"] > 1024)
    launch(pick(key, cands, launch))
    return out, lse


@torch.library.custom_op("hf_ahfa::flash_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def flash_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    sinks: torch.Tensor | None, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, win_left: int, win_right: int, softcap: float, dropout_p: float, seed: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``out (B, Q, H, DV)`` in q's dtype and ``lse (B, H, Q)``. ``win_left < 0``: no window;
    ``softcap <= 0``: none; packed sequences when ``cu_seqlens_q`` is given (then ``B == 1``)."""
    return run_fwd(q, k, v, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k, causal, win_left, win_right, softcap, dropout_p, seed, scale)


@flash_fwd.register_fake
def _(q, k, v, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      causal, win_left, win_right, softcap, dropout_p, seed, scale):
    B, Q, H, _ = q.shape
    return q.new_empty(B, Q, H, v.shape[3]), q.new_empty(B, H, Q, dtype=torch.float32)


def run_bwd(grad_out, q, k, v, out, lse, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k,
         max_seqlen_q, max_seqlen_k, causal, win_left, win_right, softcap, dropout_p, seed, scale,
         rows=None, cols=None, blocks=(1, 1)):
    c = _common(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    # the softmax denominator includes the sink; a row that sees nothing gets +inf so that p = 0
    full = lse if sinks is None else torch.logaddexp(lse, sinks.float()[None, :, None])
    lse2 = torch.where(full == float("-inf"), float("inf"), full * LOG2E).contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # (B, H, Q)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    kpm, am, kpm_strides, am_strides = _mask_args(key_padding_mask, attn_mask)
    dummy = lse2
    opt = (kpm if kpm is not None else dummy, am if am is not None else dummy,
           cu_seqlens_q if cu_seqlens_q is not None else dummy, cu_seqlens_k if cu_seqlens_k is not None else dummy)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    scalars = (scale * LOG2E, softcap, win_left, win_right, dropout_p, seed)
    flags = _flags(causal, win_left, win_right, softcap, dropout_p, key_padding_mask, attn_mask, c["varlen"],
                   c["precision"])
    flags.update(BLOCK_D=c["BLOCK_D"], BLOCK_DV=c["BLOCK_DV"], SPARSE=rows is not None,
                 LAYOUT_BQ=blocks[0], LAYOUT_BK=blocks[1])
    G = c["H"] // c["HKV"]

    def launch_dkdv(cfg):
        bm, bn, warps, stages = cfg
        grid = (triton.cdiv(c["max_k"], bn), c["nseq"] * c["HKV"])
        flash_bwd_dkdv_kernel[grid](
            q, k, v, grad_out, lse2, delta, dk, dv, *opt, *_sparse_args(cols, dummy), *strides, *dk.stride(),
            *dv.stride(), *kpm_strides, *am_strides, c["Q"], c["K"], c["H"], c["HKV"], G, c["D"], c["DV"], *scalars,
            **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
        )

    def launch_dq(cfg):
        bn, bm, warps, stages = cfg  # the dq kernel holds queries: the table's roles swap
        grid = (triton.cdiv(c["max_q"], bm), c["nseq"] * c["H"])
        flash_bwd_dq_kernel[grid](
            q, k, v, grad_out, lse2, delta, dq, *opt, *_sparse_args(rows, dummy), *strides, *dq.stride(),
            *kpm_strides, *am_strides, c["Q"], c["K"], c["H"], G, c["D"], c["DV"], *scalars,
            **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
        )

    cands = configs.candidates(configs.BWD, q.device, c["D"])
    dkdv_cands = dq_cands = cands
    if rows is not None:
        dkdv_cands, dq_cands = _sparse_candidates(cands, *blocks), _sparse_candidates(cands, *blocks, swap=True)
    key = ("bwd" if rows is None else f"sparse_bwd{blocks}", q.dtype, c["D"], c["DV"], G, causal,
           c["max_q"] > 1024, c["max_k"] > 1024)
    launch_dkdv(pick(key + ("dkdv",), dkdv_cands, launch_dkdv))
    launch_dq(pick(key + ("dq",), dq_cands, launch_dq))
    if sinks is None:
        dsinks = torch.zeros(c["H"], dtype=torch.float32, device=q.device)
    else:
        p_sink = torch.exp(sinks.float()[None, :, None] - full)  # (B, H, Q)
        dsinks = -(p_sink * delta).sum(dim=(0, 2))
    return dq, dk, dv, dsinks


@torch.library.custom_op("hf_ahfa::flash_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def flash_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, sinks: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, win_left: int, win_right: int, softcap: float,
    dropout_p: float, seed: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``dq, dk, dv`` and ``dsinks (H,)`` (zeros when there are no sinks)."""
    return run_bwd(grad_out, q, k, v, out, lse, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, causal, win_left, win_right, softcap, dropout_p, seed, scale)


@flash_bwd.register_fake
def _(grad_out, q, k, v, out, lse, sinks, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(q.shape[2], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    (q, k, v, sinks, kpm, am, cu_q, cu_k, max_q, max_k, causal, wl, wr, softcap, dropout_p, seed, scale) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sinks, kpm, am, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, wl, wr, softcap, dropout_p, seed, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, sinks, kpm, am, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv, dsinks = flash_bwd(grad_out, q, k, v, out, lse, sinks, kpm, am, cu_q, cu_k, *ctx.args)
    dsinks = None if sinks is None else dsinks.to(sinks.dtype)
    return dq, dk, dv, dsinks, *([None] * 13)


flash_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("hf_ahfa::flash_decode", mutates_args=(), device_types=("cuda", "cpu"))
def flash_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
    causal: bool, win_left: int, win_right: int, softcap: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV forward for few queries (inference only): same contract as ``flash_fwd``."""
    c = _common(q, k, v, None, 0, 0)
    B, Q, H, HKV, G = c["B"], c["Q"], c["H"], c["HKV"], c["H"] // c["HKV"]
    rows = max(16, triton.next_power_of_2(G * Q))
    block_n = 16 if configs.interpreting() else 64
    # at most two programs per SM (their pipelined K/V tiles fill shared memory), so that every split
    # runs in one wave with no straggling second wave; each split a whole number of key blocks
    sms = 4 if configs.interpreting() else torch.cuda.get_device_properties(q.device).multi_processor_count
    splits = max(1, min((2 * sms) // (B * HKV), triton.cdiv(c["K"], 4 * block_n)))
    split_len = triton.cdiv(triton.cdiv(c["K"], splits), block_n) * block_n
    splits = triton.cdiv(c["K"], split_len)
    o_part = torch.empty(B * HKV, splits, rows, c["DV"], dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * HKV, splits, rows, dtype=torch.float32, device=q.device)
    kpm, am, kpm_strides, am_strides = _mask_args(key_padding_mask, attn_mask)
    flash_decode_kernel[(splits, B * HKV)](
        q, k, v, o_part, lse_part, kpm if kpm is not None else o_part, am if am is not None else o_part,
        *q.stride(), *k.stride(), *v.stride(), *kpm_strides, *am_strides,
        Q, c["K"], HKV, G, c["D"], c["DV"], split_len, scale * LOG2E, softcap, win_left, win_right,
        CAUSAL=causal, HAS_WINDOW=win_left >= 0, SOFTCAP=softcap > 0, HAS_KPM=kpm is not None,
        HAS_AM=am is not None, PRECISION=c["precision"], BLOCK_M=rows, BLOCK_N=block_n,
        BLOCK_D=c["BLOCK_D"], BLOCK_DV=c["BLOCK_DV"], num_warps=4, num_stages=3,
    )
    out = torch.empty(B, Q, H, c["DV"], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Q, dtype=torch.float32, device=q.device)
    flash_decode_combine_kernel[(B * HKV * G * Q,)](
        o_part, lse_part, sinks if sinks is not None else lse, out, lse, *out.stride(),
        Q, H, HKV, G, splits, ROWS=rows, DV=c["DV"], HAS_SINKS=sinks is not None,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_DV=c["BLOCK_DV"], num_warps=1,
    )
    return out, lse


@flash_decode.register_fake
def _(q, k, v, sinks, key_padding_mask, attn_mask, causal, win_left, win_right, softcap, scale):
    B, Q, H, _ = q.shape
    return q.new_empty(B, Q, H, v.shape[3]), q.new_empty(B, H, Q, dtype=torch.float32)
