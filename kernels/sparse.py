"""Launch wrappers of the block-sparse flash kernels, registered as PyTorch ops.

The block-sparse path runs the dense kernels of ``flash_kernels`` with ``SPARSE=True``: each query
block visits only the key blocks its layout lists (``hf_ahfa.block_layout.BlockLayout.resolve``),
first those that need the element mask (causal diagonal, window edges, padding), then the "full" ones
without any mask arithmetic. The backward's dk/dv kernel walks the transposed lists (per key block, the
query blocks that listed it). All exact-path semantics (GQA, causal, window, softcap, sinks, padding,
packed sequences, dropout) hold inside the listed blocks; keys in unlisted blocks are treated as masked.
"""

from __future__ import annotations

import torch

from hf_ahfa.kernels.flash import run_bwd, run_fwd


@torch.library.custom_op("hf_ahfa::sparse_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def sparse_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    sinks: torch.Tensor | None, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, win_left: int, win_right: int, softcap: float, dropout_p: float, seed: int, scale: float,
    count: torch.Tensor, index: torch.Tensor, full_count: torch.Tensor, full_index: torch.Tensor,
    t_count: torch.Tensor | None, t_index: torch.Tensor | None, t_full_count: torch.Tensor | None,
    t_full_index: torch.Tensor | None, block_q: int, block_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward, same contract as ``flash_fwd``. ``count/index`` ``(B, H, NQ[, NK])`` int32:
    the masked key blocks per query block, ``full_count/full_index`` the unmasked ones; ``t_*`` the
    transposed lists ``(B, H, NK[, NQ])`` that the backward needs (``None`` for inference only)."""
    return run_fwd(q, k, v, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k, causal, win_left, win_right, softcap, dropout_p, seed, scale,
                   lists=(count, index, full_count, full_index), blocks=(block_q, block_k))


@sparse_fwd.register_fake
def _(q, k, v, *args):
    B, Q, H, _ = q.shape
    return q.new_empty(B, Q, H, v.shape[3]), q.new_empty(B, H, Q, dtype=torch.float32)


@torch.library.custom_op("hf_ahfa::sparse_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def sparse_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, sinks: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, win_left: int, win_right: int, softcap: float,
    dropout_p: float, seed: int, scale: float,
    count: torch.Tensor, index: torch.Tensor, full_count: torch.Tensor, full_index: torch.Tensor,
    t_count: torch.Tensor, t_index: torch.Tensor, t_full_count: torch.Tensor, t_full_index: torch.Tensor,
    block_q: int, block_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-sparse backward: ``dq, dk, dv, dsinks`` of the block-sparse forward."""
    return run_bwd(grad_out, q, k, v, out, lse, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k,
                   max_seqlen_q, max_seqlen_k, causal, win_left, win_right, softcap, dropout_p, seed, scale,
                   rows=(count, index, full_count, full_index), cols=(t_count, t_index, t_full_count, t_full_index),
                   blocks=(block_q, block_k))


@sparse_bwd.register_fake
def _(grad_out, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(q.shape[2], dtype=torch.float32)


_FWD_ARGS = [a.name for a in sparse_fwd._opoverload._schema.arguments]  # bind autograd inputs by name


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    tensors = ("q", "k", "v", "sinks", "key_padding_mask", "attn_mask", "cu_seqlens_q", "cu_seqlens_k",
               "count", "index", "full_count", "full_index", "t_count", "t_index", "t_full_count", "t_full_index")
    ctx.save_for_backward(*output, *(args[n] for n in tensors))
    ctx.tensor_names = tensors
    ctx.args = {n: a for n, a in args.items() if n not in tensors}


def _backward(ctx, grad_out, grad_lse):
    out, lse, *saved = ctx.saved_tensors
    args = dict(zip(ctx.tensor_names, saved), **ctx.args)
    if args["t_count"] is None:
        raise RuntimeError("hf_ahfa.sparse_fwd was called without the transposed lists (t_count, ...) that its "
                           "backward needs; build them with BlockLayout.resolve(..., backward=True)")
    dq, dk, dv, dsinks = sparse_bwd(grad_out, out=out, lse=lse, **args)
    sinks = args["sinks"]
    grads = {"q": dq, "k": dk, "v": dv, "sinks": None if sinks is None else dsinks.to(sinks.dtype)}
    return tuple(grads.get(n) for n in _FWD_ARGS)


sparse_fwd.register_autograd(_backward, setup_context=_setup_context)
