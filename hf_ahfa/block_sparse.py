"""Block-sparse attention on a ``BlockLayout``: the Triton block-sparse kernels, or the reference with the
layout expanded to a token mask. Keys outside the layout's blocks count as masked."""

from __future__ import annotations

import torch

from hf_ahfa.block_layout import BlockLayout, band_blocks
from hf_ahfa.masks import make_layout
from hf_ahfa.select import band_of_shape
from hf_ahfa.spec import AttnCall


def layout_band(call: AttnCall, block_q: int, block_k: int, q_len: int, k_len: int, device):
    """``band_blocks`` of a call: cached per shape when unpacked, per packed sequence otherwise."""
    if call.cu_seqlens is None:
        return band_of_shape(q_len, k_len, block_q, block_k, call.causal, call.window, device)
    q_lens, k_lens = call.cu_seqlens[0].diff(), call.cu_seqlens[1].diff()
    return band_blocks(q_lens, k_lens, block_q, block_k, -(-call.max_q // block_q), -(-call.max_k // block_k),
                       call.causal, call.window)


def sparse_kernels(q, k, v, layout: BlockLayout, call: AttnCall,
                   skip_mass: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` through ``hf_ahfa::sparse_fwd``; ``layout`` already resolved for this call
    (``BlockLayout.resolve``), with transposed lists when a gradient is needed. ``skip_mass``: the kernel's
    error-bounded tile skipping (inference only, see ``sparse_fwd``)."""
    from hf_ahfa.kernels.sparse import sparse_fwd

    cu_q, cu_k = call.cu_seqlens or (None, None)
    a = call.kernel_args()
    return sparse_fwd(
        q, k, v, call.sinks, call.key_padding_mask, None, cu_q, cu_k, call.max_q, call.max_k, a["causal"],
        a["win_left"], a["win_right"], a["softcap"], call.dropout_p, call.dropout_seed(), a["scale"],
        count=layout.kv_count, index=layout.kv_index, full_count=layout.full_count, full_index=layout.full_index,
        t_count=layout.q_count, t_index=layout.q_index, t_full_count=layout.full_q_count,
        t_full_index=layout.full_q_index, block_q=layout.block_q, block_k=layout.block_k, skip_mass=skip_mass,
        alibi=call.alibi,
    )


def sparse_reference(q, k, v, layout: BlockLayout, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the reference with the layout's blocks as a token mask."""
    from hf_ahfa.reference import reference_attention

    Q, K = q.shape[1], k.shape[1]
    mask = token_mask(layout.to_dense(), layout.block_q, layout.block_k, call.cu_seqlens, Q, K)
    if call.key_padding_mask is not None:
        mask = mask & call.key_padding_mask[:, None, None, :]
    return reference_attention(q, k, v, make_layout(Q, K, q.device, *(call.cu_seqlens or (None, None))),
                               call.replace(key_padding_mask=None, attn_mask=mask))


def token_mask(selected: torch.Tensor, block_q: int, block_k: int, cu_seqlens, Q: int, K: int) -> torch.Tensor:
    """A bool block selection as a token mask ``(B, H, Q, K)`` (packed: ``(1, H, Q, K)``, sequences on the
    diagonal)."""
    if cu_seqlens is None:
        return selected.repeat_interleave(block_q, 2).repeat_interleave(block_k, 3)[:, :, :Q, :K]
    mask = torch.zeros(1, selected.shape[1], Q, K, dtype=torch.bool, device=selected.device)
    cu_q, cu_k = cu_seqlens[0].tolist(), cu_seqlens[1].tolist()
    for i in range(len(cu_q) - 1):
        blocks = selected[i].repeat_interleave(block_q, 1).repeat_interleave(block_k, 2)
        mask[0, :, cu_q[i]:cu_q[i + 1], cu_k[i]:cu_k[i + 1]] = blocks[:, : cu_q[i + 1] - cu_q[i], : cu_k[i + 1] - cu_k[i]]
    return mask
