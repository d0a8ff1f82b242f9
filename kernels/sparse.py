"""Launch wrappers of the block-sparse flash kernels, registered as PyTorch ops.

The block-sparse path runs the dense kernels of ``flash_kernels`` with a ``LISTS`` argument (which
turns on ``F.sparse``): each query block visits only the key blocks its layout lists
(``hf_ahfa.block_layout.BlockLayout.resolve``),
first those that need the element mask (causal diagonal, window edges, padding), then the "full" ones
without any mask arithmetic. The backward's dk/dv kernel walks the transposed lists (per key block, the
query blocks that listed it). All exact-path semantics (GQA, causal, window, softcap, sinks, padding,
packed sequences, dropout) hold inside the listed blocks; keys in unlisted blocks are treated as masked.
"""

from __future__ import annotations

import torch

from hf_ahfa.kernels.flash import fake_bwd, fake_fwd, register_autograd, run_bwd, run_fwd


@torch.library.custom_op("hf_ahfa::sparse_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def sparse_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    sinks: torch.Tensor | None, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, win_left: int, win_right: int, softcap: float, dropout_p: float, seed: int, scale: float,
    count: torch.Tensor, index: torch.Tensor, full_count: torch.Tensor, full_index: torch.Tensor,
    t_count: torch.Tensor | None, t_index: torch.Tensor | None, t_full_count: torch.Tensor | None,
    t_full_index: torch.Tensor | None, block_q: int, block_k: int, skip_mass: float = 0.0,
    alibi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward, same contract as ``flash_fwd``. ``count/index`` ``(B, H, NQ[, NK])`` int32:
    the masked key blocks per query block, ``full_count/full_index`` the unmasked ones; ``t_*`` the
    transposed lists ``(B, H, NK[, NQ])`` that the backward needs (``None`` for inference only).

    ``skip_mass`` in ``[0, 1)`` (inference only: no backward, no dropout): within the listed blocks, the P @ V
    product of a kernel tile is skipped, and its mass left out of the softmax, while every row of the query
    tile has left out at most that share of its mass (an upper bound: each skipped tile counted against the
    denominator seen so far). The output is then exact attention over the kept keys: off by at most
    ``2 * skip_mass * max|v|`` per element. 0 computes every listed tile."""
    if skip_mass and (t_count is not None or dropout_p > 0):
        raise ValueError("skip_mass > 0 is for inference: no transposed lists (backward) and no dropout")
    if not 0.0 <= skip_mass < 1.0:
        raise ValueError(f"skip_mass must be in [0, 1), got {skip_mass}")
    return run_fwd(q, k, v, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k, causal, win_left, win_right, softcap, dropout_p, seed, scale,
                   lists=(count, index, full_count, full_index), blocks=(block_q, block_k), skip_mass=skip_mass,
                   alibi=alibi)


sparse_fwd.register_fake(fake_fwd)


@torch.library.custom_op("hf_ahfa::sparse_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def sparse_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, sinks: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, win_left: int, win_right: int, softcap: float,
    dropout_p: float, seed: int, scale: float,
    count: torch.Tensor, index: torch.Tensor, full_count: torch.Tensor, full_index: torch.Tensor,
    t_count: torch.Tensor, t_index: torch.Tensor, t_full_count: torch.Tensor, t_full_index: torch.Tensor,
    block_q: int, block_k: int, alibi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-sparse backward: ``dq, dk, dv, dsinks`` of the block-sparse forward."""
    return run_bwd(grad_out, q, k, v, out, lse, sinks, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k,
                   max_seqlen_q, max_seqlen_k, causal, win_left, win_right, softcap, dropout_p, seed, scale,
                   rows=(count, index, full_count, full_index), cols=(t_count, t_index, t_full_count, t_full_index),
                   blocks=(block_q, block_k), alibi=alibi)


sparse_bwd.register_fake(fake_bwd)


def _needs_transposed_lists(args):
    if args["t_count"] is None:
        raise RuntimeError("hf_ahfa.sparse_fwd was called without the transposed lists (t_count, ...) that its "
                           "backward needs; build them with BlockLayout.resolve(..., backward=True)")


register_autograd(sparse_fwd, sparse_bwd, check=_needs_transposed_lists)
