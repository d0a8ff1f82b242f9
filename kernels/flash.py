"""Launch wrappers of the dense flash kernels, and their registration as PyTorch ops.

``torch.ops.hf_ahfa.flash_fwd`` / ``flash_bwd`` / ``flash_decode`` are custom ops with fake (meta)
implementations and autograd, so ``torch.compile`` and activation checkpointing see one opaque op. Each wraps a
plain ``run_*`` function, which the router calls directly for eager calls without a gradient (the op's
dispatch costs tens of microseconds of host time per call). All tensors use the public layout ``(B, T, H, D)``;
``lse`` is ``(B, H, T)`` float32, natural log, sinks excluded.
"""

from __future__ import annotations

import functools

import torch
import triton

from hf_ahfa.kernels import common, configs
from hf_ahfa.kernels.common import (
    Scores, block_size, cdiv, mask_args, next_power_of_2, precision, tensor_arg, tma_modes,
)
from hf_ahfa.kernels.flash_kernels import (
    flash_bwd_delta_kernel,
    flash_bwd_dkdv_kernel,
    flash_bwd_dq_kernel,
    flash_decode_combine_kernel,
    flash_decode_kernel,
    flash_fwd_kernel,
)
from hf_ahfa.kernels.launch import launch
from hf_ahfa.kernels.tuning import launch_tuned

LOG2E = 1.4426950408889634


def check_supported(q: torch.Tensor) -> None:
    """Raise a clear error when these kernels cannot run a call with query ``q``."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {q.dtype}")
    if common.TRITON_VERSION < (3, 4):  # (3.2 and 3.3 reject the kernels' constexpr tuples when compiling)
        raise RuntimeError(f"the Triton kernels need triton 3.4 or newer, got {triton.__version__}")
    if q.device.type == "cpu" and configs.interpreting():
        if q.dtype == torch.bfloat16:
            raise TypeError("bfloat16 does not run under TRITON_INTERPRET")
        return
    if q.device.type != "cuda":
        raise RuntimeError(f"the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1), got device {q.device}")
    configs.arch(q.device)  # raises below sm80


def _alibi(slopes):
    """Kernel argument ``ALIBI``: ``(slopes, stride_b)`` of ``(Hq,)`` or ``(B, Hq)`` float32 slopes, or None."""
    if slopes is None:
        return None
    return (slopes, 0 if slopes.dim() == 1 else slopes.stride(0))


def _packed(cu_seqlens_q, cu_seqlens_k):
    """Kernel argument ``CU`` of packed sequences."""
    return None if cu_seqlens_q is None else (cu_seqlens_q, cu_seqlens_k)


def _lists(lists):
    """Kernel argument of a block-sparse layout's lists ``(count, index, full_count, full_index)``."""
    if lists is None:
        return None
    count, index, fcount, findex = lists
    return (count, index, fcount, findex, index.shape[-2], index.shape[-1])


def _common(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    B, Q, H, D = q.shape
    K, HKV, DV = k.shape[1], k.shape[2], v.shape[3]
    varlen = cu_seqlens_q is not None
    nseq = cu_seqlens_q.numel() - 1 if varlen else B
    return dict(
        B=B, Q=Q, K=K, H=H, HKV=HKV, D=D, DV=DV, varlen=varlen, nseq=nseq,
        max_q=max_seqlen_q if varlen else Q, max_k=max_seqlen_k if varlen else K,
        precision=precision(q.dtype),
    )


def _constexprs(c, causal, blocks):
    """The explicit compile-time arguments of the flash kernels (the rest are derived by ``common.flags``)."""
    return dict(D=c["D"], DV=c["DV"], CAUSAL=causal, PRECISION=c["precision"], LAYOUT_BQ=blocks[0],
                LAYOUT_BK=blocks[1])


def _tuning_key(kind, q, c, causal, scores, alibi, *optional):
    """What a launch configuration's fit and speed depend on: dtype, head dims, GQA group, lengths, and the
    kernel's compile-time variant (score features, ALiBi and its form, which optional inputs are compiled in)."""
    return (kind, q.dtype, c["D"], c["DV"], c["H"] // c["HKV"], c["precision"], causal, c["max_q"] > 1024,
            c["max_k"] > 1024, scores.softcap > 0, scores.win_left >= 0, scores.dropout_p > 0, scores.skip > 0,
            alibi is not None, common.alibi_keys(alibi is not None, causal, c["Q"], backward="bwd" in kind),
            *(x is not None for x in optional))


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
            causal, win_left, win_right, softcap, dropout_p, seed, scale, lists=None, blocks=(1, 1), skip_mass=0.0,
            alibi=None):
    c = _common(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = torch.empty(c["B"], c["Q"], c["H"], c["DV"], dtype=q.dtype, device=q.device)
    lse = torch.empty(c["B"], c["H"], c["Q"], dtype=torch.float32, device=q.device)
    scores = Scores(scale * LOG2E, softcap, win_left, win_right, dropout_p, seed, skip_mass)
    args = (
        tensor_arg(q), tensor_arg(k), tensor_arg(v), tensor_arg(out), lse, sinks,
        *mask_args(key_padding_mask, attn_mask), _alibi(alibi), _packed(cu_seqlens_q, cu_seqlens_k), _lists(lists),
        c["Q"], c["K"], c["H"], c["H"] // c["HKV"], scores,
    )
    consts = _constexprs(c, causal, blocks)
    # float32: one launch config and, unless AHFA_TMA=1 asks for TMA, pointer loads (each candidate is a slow compile)
    float32 = q.dtype == torch.float32
    modes = (False,) if float32 and common.TMA == "auto" else tma_modes(k, v)

    def launch_fwd(cfg):
        bm, bn, warps, stages, tma = cfg
        launch(flash_fwd_kernel, (cdiv(c["max_q"], bm), c["nseq"] * c["H"]), args,
               dict(consts, BLOCK_M=bm, BLOCK_N=bn, TMA=tma, num_warps=warps, num_stages=stages))

    cands = configs.candidates(configs.FWD_FLOAT32 if float32 else configs.FWD, q.device, c["D"])
    if lists is not None:
        cands = _sparse_candidates(cands, *blocks)
    # each tile config with each load mode (TMA first): timed, or the first that fits; none that ptxas crashes on
    cands = [(*cfg, tma) for tma in modes for cfg in cands if not (tma and cfg[3] in common.TMA_CRASH_STAGES)]
    key = _tuning_key("fwd" if lists is None else f"sparse_fwd{blocks}", q, c, causal, scores, alibi, sinks,
                      key_padding_mask, attn_mask, cu_seqlens_q) + (modes,)
    launch_tuned(key, cands, launch_fwd)
    return out, lse


@torch.library.custom_op("hf_ahfa::flash_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def flash_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    sinks: torch.Tensor | None, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, win_left: int, win_right: int, softcap: float, dropout_p: float, seed: int, scale: float,
    alibi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``out (B, Q, H, DV)`` in q's dtype and ``lse (B, H, Q)``. ``win_left < 0``: no window;
    ``softcap <= 0``: none; packed sequences when ``cu_seqlens_q`` is given (then ``B == 1``); ``alibi``:
    ``(H,)`` or ``(B, H)`` float32 slopes (``B`` = sequences when packed)."""
    return run_fwd(q, k, v, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k, causal, win_left, win_right, softcap, dropout_p, seed, scale, alibi=alibi)


def fake_fwd(q, k, v, *args):
    """Shapes of a forward op's ``(out, lse)``."""
    B, Q, H, _ = q.shape
    return q.new_empty(B, Q, H, v.shape[3]), q.new_empty(B, H, Q, dtype=torch.float32)


flash_fwd.register_fake(fake_fwd)


def _delta(grad_out, out):
    """``rowsum(grad_out * out)`` in float32, ``(B, H, Q)``: one kernel that reads both tensors once (in PyTorch,
    the float32 copies, product and sum are several passes and two transient float32 tensors of ``out``'s size)."""
    B, Q, H, DV = out.shape
    delta = torch.empty(B, H, Q, dtype=torch.float32, device=out.device)
    block_dv = block_size(DV)
    bm = 16 if configs.interpreting() else 64 if block_dv <= 128 else 32
    launch(flash_bwd_delta_kernel, (cdiv(Q, bm), B * H), (tensor_arg(out), tensor_arg(grad_out), delta, Q, H),
           dict(DV=DV, BLOCK_M=bm, BLOCK_DV=block_dv, num_warps=4))
    return delta


def run_bwd(grad_out, q, k, v, out, lse, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, causal, win_left, win_right, softcap, dropout_p, seed, scale,
            rows=None, cols=None, blocks=(1, 1), alibi=None):
    c = _common(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    # the softmax denominator includes the sink; a row that sees nothing gets +inf so that p = 0
    full = lse if sinks is None else torch.logaddexp(lse, sinks.float()[None, :, None])
    lse2 = torch.where(full == float("-inf"), float("inf"), full * LOG2E).contiguous()
    delta = _delta(grad_out, out)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    inputs = (tensor_arg(q), tensor_arg(k), tensor_arg(v), tensor_arg(grad_out), lse2, delta)
    masks = (*mask_args(key_padding_mask, attn_mask), _alibi(alibi), _packed(cu_seqlens_q, cu_seqlens_k))
    scores = Scores(scale * LOG2E, softcap, win_left, win_right, dropout_p, seed)
    consts = _constexprs(c, causal, blocks)
    G = c["H"] // c["HKV"]

    def launch_dkdv(cfg):
        bm, bn, warps, stages = cfg
        grid = (cdiv(c["max_k"], bn), c["nseq"] * c["HKV"])
        launch(flash_bwd_dkdv_kernel, grid,
               (*inputs, tensor_arg(dk), tensor_arg(dv), *masks, _lists(cols), c["Q"], c["K"], c["H"], c["HKV"], G,
                scores), dict(consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages))

    def launch_dq(cfg):
        bn, bm, warps, stages = cfg  # the dq kernel holds queries: the table's roles swap
        grid = (cdiv(c["max_q"], bm), c["nseq"] * c["H"])
        launch(flash_bwd_dq_kernel, grid,
               (*inputs, tensor_arg(dq), *masks, _lists(rows), c["Q"], c["K"], c["H"], G, scores),
               dict(consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages))

    float32 = q.dtype == torch.float32  # (as in the forward: one launch config)
    cands = configs.candidates(configs.BWD_FLOAT32 if float32 else configs.BWD, q.device, c["D"])
    dkdv_cands = dq_cands = cands
    if rows is not None:
        dkdv_cands, dq_cands = _sparse_candidates(cands, *blocks), _sparse_candidates(cands, *blocks, swap=True)
    key = _tuning_key("bwd" if rows is None else f"sparse_bwd{blocks}", q, c, causal, scores, alibi, sinks,
                      key_padding_mask, attn_mask, cu_seqlens_q)
    launch_tuned(key + ("dkdv",), dkdv_cands, launch_dkdv)
    launch_tuned(key + ("dq",), dq_cands, launch_dq)
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
    dropout_p: float, seed: int, scale: float, alibi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``dq, dk, dv`` and ``dsinks (H,)`` (zeros when there are no sinks)."""
    return run_bwd(grad_out, q, k, v, out, lse, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k,
                   max_seqlen_q, max_seqlen_k, causal, win_left, win_right, softcap, dropout_p, seed, scale,
                   alibi=alibi)


def fake_bwd(grad_out, q, k, v, *args):
    """Shapes of a backward op's ``(dq, dk, dv, dsinks)``."""
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(q.shape[2], dtype=torch.float32)


flash_bwd.register_fake(fake_bwd)


def _arg_names(op) -> tuple[str, ...]:
    return tuple(arg.name for arg in op._opoverload._schema.arguments)


def register_autograd(fwd, bwd, check=None):
    """Autograd of the forward op ``fwd`` through the backward op ``bwd``, their arguments matched by name:
    ``bwd`` takes ``grad_out``, the forward's ``out`` and ``lse`` and any of its arguments, and returns the
    gradients of ``q, k, v, sinks``. ``check(args)`` may refuse a backward that the forward's arguments
    cannot serve."""
    fwd_names, bwd_names = _arg_names(fwd), _arg_names(bwd)[1:]

    def setup_context(ctx, inputs, output):
        args = dict(zip(fwd_names, inputs), out=output[0], lse=output[1])
        ctx.tensor_names = [n for n in bwd_names if isinstance(args[n], torch.Tensor)]
        ctx.save_for_backward(*(args[n] for n in ctx.tensor_names))
        ctx.args = {n: args[n] for n in bwd_names if n not in ctx.tensor_names}

    def backward(ctx, grad_out, grad_lse):
        args = dict(zip(ctx.tensor_names, ctx.saved_tensors), **ctx.args)
        if check is not None:
            check(args)
        dq, dk, dv, dsinks = bwd(grad_out, **args)
        sinks = args["sinks"]
        grads = dict(q=dq, k=dk, v=dv, sinks=None if sinks is None else dsinks.to(sinks.dtype))
        return tuple(grads.get(n) for n in fwd_names)

    fwd.register_autograd(backward, setup_context=setup_context)


register_autograd(flash_fwd, flash_bwd)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """The GPU's SM count, read once per device (the property lookup costs host time on every decode call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def run_decode(q, k, v, sinks, key_padding_mask, attn_mask, causal, win_left, win_right, softcap, scale, alibi=None):
    c = _common(q, k, v, None, 0, 0)
    B, Q, H, HKV, G = c["B"], c["Q"], c["H"], c["HKV"], c["H"] // c["HKV"]
    rows = max(16, next_power_of_2(G * Q))
    cands = configs.DECODE_INTERPRETER if configs.interpreting() else configs.DECODE
    block_n = cands[0][0]
    # at most two programs per SM (their pipelined K/V tiles fill shared memory), so that every split
    # runs in one wave with no straggling second wave; each split a whole number of key blocks
    sms = 4 if configs.interpreting() else _sm_count(q.device)
    splits = max(1, min((2 * sms) // (B * HKV), cdiv(c["K"], 4 * block_n)))
    split_len = cdiv(cdiv(c["K"], splits), block_n) * block_n
    splits = cdiv(c["K"], split_len)
    o_part = torch.empty(B * HKV, splits, rows, c["DV"], dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * HKV, splits, rows, dtype=torch.float32, device=q.device)
    scores = Scores(scale * LOG2E, softcap, win_left, win_right)
    args = (tensor_arg(q), tensor_arg(k), tensor_arg(v), o_part, lse_part, *mask_args(key_padding_mask, attn_mask),
            _alibi(alibi), Q, c["K"], HKV, G, split_len, scores)

    def launch_decode(cfg):
        bn, warps, stages = cfg
        launch(flash_decode_kernel, (splits, B * HKV), args,
               dict(D=c["D"], DV=c["DV"], CAUSAL=causal, PRECISION=c["precision"], BLOCK_M=rows, BLOCK_N=bn,
                    num_warps=warps, num_stages=stages))

    # chosen per cache length (its power of two): a short cache's call is host-bound, so its timing is noise, and a
    # choice made there must not decide a long cache's bandwidth-bound one
    launch_tuned(_tuning_key("decode", q, c, causal, scores, alibi, sinks, key_padding_mask, attn_mask)
                 + (rows, max(c["K"] - 1, 0).bit_length()), cands, launch_decode)
    out = torch.empty(B, Q, H, c["DV"], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Q, dtype=torch.float32, device=q.device)
    launch(flash_decode_combine_kernel, (B * HKV * G * Q,),
           (o_part, lse_part, sinks, tensor_arg(out), lse, Q, H, HKV, G, splits),
           dict(ROWS=rows, DV=c["DV"], BLOCK_S=max(2, next_power_of_2(splits)), BLOCK_DV=block_size(c["DV"]),
                num_warps=1))
    return out, lse


@torch.library.custom_op("hf_ahfa::flash_decode", mutates_args=(), device_types=("cuda", "cpu"))
def flash_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
    causal: bool, win_left: int, win_right: int, softcap: float, scale: float, alibi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV forward for few queries (inference only): same contract as ``flash_fwd``."""
    return run_decode(q, k, v, sinks, key_padding_mask, attn_mask, causal, win_left, win_right, softcap, scale, alibi)


flash_decode.register_fake(fake_fwd)
