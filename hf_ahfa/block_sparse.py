"""Block-sparse attention on a ``BlockLayout``: the Triton block-sparse kernels, or the reference with the
layout expanded to a token mask. Keys outside the layout's blocks count as masked."""

from __future__ import annotations

import torch

from hf_ahfa.block_layout import BlockLayout, band_blocks
from hf_ahfa.masks import make_layout, positions_visible
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


def skip_reference(q, k, v, layout: BlockLayout, call: AttnCall, skip_mass: float, block_m: int,
                   block_n: int) -> tuple[torch.Tensor, float]:
    """PyTorch reference of the block-sparse forward kernel's tile skipping (``sparse_kernels(..., skip_mass)``),
    replayed tile by tile in the kernel's order. Each query tile of ``block_m`` rows walks its layout block's
    lists, first the blocks that need the element mask, then the others, each in tiles of ``block_n`` keys, with
    an online softmax; a tile's P @ V is left out, and its mass taken out of the rows' sums, while every row's
    bound of the mass left out (each left-out tile's share of the row's sum at that tile, added up) stays within
    ``skip_mass``. ``block_m`` / ``block_n`` are the launch config's tile (16 x 16 under the interpreter).

    ``q (B, Q, H, D)``, ``k, v (B, K, Hkv, D)``, ``layout`` resolved for the call -> ``(out (B, Q, H, Dv),
    share of the listed tiles left out)``. Unpacked calls without sinks, key padding, ALiBi or dropout; rows past
    ``Q`` in a ragged last tile are left out of the rule (the kernel's, which see keys, can only skip less)."""
    unsupported = [n for n in ("sinks", "key_padding_mask", "attn_mask", "cu_seqlens", "alibi")
                   if getattr(call, n) is not None] + (["dropout_p"] if call.dropout_p else [])
    if unsupported or layout.block_q % block_m or layout.block_k % block_n:
        raise ValueError(f"skip_reference: unsupported {unsupported or 'tile'} (block_m {block_m} must divide "
                         f"block_q {layout.block_q}, block_n {block_n} block_k {layout.block_k})")
    B, Q, H, D = q.shape
    K, group, dev = k.shape[1], H // k.shape[2], q.device
    nqt = -(-Q // block_m)
    # one "program" per (batch, head, query tile): its key tiles' first keys in the kernel's order, -1 padded
    b, h, t = (x.flatten() for x in torch.meshgrid(torch.arange(B, device=dev), torch.arange(H, device=dev),
                                                  torch.arange(nqt, device=dev), indexing="ij"))
    qb = t * block_m // layout.block_q
    lists = [(layout.kv_count, layout.kv_index)] + (
        [(layout.full_count, layout.full_index)] if layout.full_count is not None else [])
    per_block = torch.arange(0, layout.block_k, block_n, device=dev)
    starts = []
    for count, index in lists:
        n, idx = count[b, h, qb], index[b, h, qb]  # (P,), (P, NK)
        listed = torch.arange(idx.shape[-1], device=dev) < n[:, None]
        tiles = (idx[..., None] * layout.block_k + per_block).flatten(1)
        starts.append(torch.where(listed.repeat_interleave(len(per_block), 1), tiles, -1))
    starts = torch.cat(starts, 1)
    rows = t[:, None] * block_m + torch.arange(block_m, device=dev)  # (P, BM)
    qt = q[b[:, None], rows.clamp(max=Q - 1), h[:, None]].double()  # (P, BM, D)
    m = torch.full(rows.shape, float("-inf"), dtype=torch.float64, device=dev)
    l = torch.zeros_like(m)
    dropped = torch.zeros_like(m)
    acc = torch.zeros(*rows.shape, v.shape[-1], dtype=torch.float64, device=dev)
    skipped = 0
    for j in range(starts.shape[1]):
        keys = starts[:, j, None] + torch.arange(block_n, device=dev)  # (P, BN)
        real = (starts[:, j, None] >= 0) & (keys < K)
        kt = k[b[:, None], keys.clamp(0, K - 1), (h // group)[:, None]].double()
        vt = v[b[:, None], keys.clamp(0, K - 1), (h // group)[:, None]].double()
        s = torch.einsum("pmd,pnd->pmn", qt, kt) * call.scale
        if call.softcap:
            s = call.softcap * torch.tanh(s / call.softcap)
        ok = positions_visible(rows[:, :, None] + (K - Q), keys[:, None, :], causal=call.causal, window=call.window)
        s = s.masked_fill(~(ok & real[:, None, :] & (rows < Q)[:, :, None]), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        tile = p.sum(-1)
        l, acc, m = l * alpha + tile, acc * alpha[..., None], m_new
        share = torch.where(l > 0, tile / l.clamp_min(1e-300), 0.0)
        skip = ((dropped + share).amax(-1) <= skip_mass) & (skip_mass > 0) & real.any(-1)
        dropped = torch.where(skip[:, None], dropped + share, dropped)
        l = torch.where(skip[:, None], l - tile, l)
        acc = acc + torch.where(skip[:, None, None], 0.0, p @ vt)
        skipped += int(skip.sum())
    out = torch.where(l[..., None] > 0, acc / l.clamp_min(1e-300)[..., None], 0.0)
    full = torch.zeros(B, H, nqt * block_m, v.shape[-1], dtype=torch.float64, device=dev)
    full.view(B * H, nqt, block_m, -1)[b * H + h, t] = out
    return full[:, :, :Q].transpose(1, 2).to(q.dtype), skipped / max(int((starts >= 0).sum()), 1)


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
