"""The adaptive mode's selection: which key blocks each query block keeps, as a ``BlockLayout``.

Per (batch, head, query block) the union over its sampled query rows of each row's fewest key blocks whose
estimated mass reaches ``tau``, plus the anchors (sink and local blocks); a head whose selection is denser
than ``density_limit`` keeps all its visible blocks (per-head fallback). ``select_layout`` is the PyTorch
reference; on the Triton kernels ``select_layout_of_tiles`` does the same in two launches
(``hf_ahfa::select_lists``). Block geometry per call shape is cached, built without host syncs.
"""

from __future__ import annotations

import functools

import torch

from hf_ahfa.block_layout import LIST_FIELDS, BlockLayout, band_blocks, fit_to_band
from hf_ahfa.policy import AdaptivePolicy


def anchor_blocks(q_len: int, k_len: int, policy: AdaptivePolicy, causal: bool, device) -> torch.Tensor:
    """Blocks kept whatever the estimate: ``sink_blocks`` leading key blocks and ``local_blocks`` up to
    each query block's diagonal (on both sides without ``causal``): bool ``(1, 1, NQ, NK)``."""
    bs = policy.block_size
    nq, nk = -(-q_len // bs), -(-k_len // bs)
    q0 = torch.arange(nq, device=device)[:, None] * bs + (k_len - q_len)
    q_last = torch.clamp(q0 + bs, max=k_len) - 1
    k_first = torch.arange(nk, device=device)[None, :] * bs
    reach = (policy.local_blocks - 1) * bs
    local = (k_first + bs - 1 >= q0 - reach) & (k_first <= q_last + (0 if causal else reach))
    sink = (k_first < policy.sink_blocks * bs).expand(nq, nk)
    return (local | sink)[None, None]


def select_blocks(mass: torch.Tensor, touched: torch.Tensor, anchors: torch.Tensor, tau: float,
                  density_limit: float, rows_per_block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept blocks ``(B, H, NQ, NK)`` bool and the heads that fell back to all blocks ``(B, H)``.

    ``mass (B, H, NR, NK)``: estimated mass per key block of each sampled query row, ``rows_per_block``
    consecutive rows per query block (the last block may have fewer; ``1``: one estimate per query block);
    ``touched (1, 1, NQ, NK)``: the blocks any query can see; ``anchors``: blocks always kept. Each row takes
    its blocks by descending mass until the mass already taken reaches ``tau`` (of its total mass: zero outside
    ``touched``, as the estimator gives it); a query block keeps the union of its rows' blocks, so that every
    sampled row keeps ``tau`` of its mass (a mean over the rows lets the rows that differ from it lose more:
    ``scripts/estimator_study.py``).
    """
    B, H, NR, NK = mass.shape
    NQ = touched.shape[-2]
    touched = touched.expand(B, H, NQ, NK)
    if tau >= 1.0:
        keep = touched.clone()
    else:
        m = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
        vals, order = m.sort(-1, descending=True)
        taken_before = vals.cumsum(-1) - vals
        rows = torch.zeros_like(m, dtype=torch.bool).scatter(-1, order, (taken_before < tau) & (vals > 0))
        rows = torch.nn.functional.pad(rows, (0, 0, 0, NQ * rows_per_block - NR))
        keep = (rows.view(B, H, NQ, rows_per_block, NK).any(3) | anchors) & touched
    visible = touched.sum((2, 3)).clamp_min(1)
    dense = keep.sum((2, 3)) > density_limit * visible
    keep = torch.where(dense[..., None, None], touched, keep)
    return keep, dense


def select_layout(mass: torch.Tensor, q_len: int, k_len: int, policy: AdaptivePolicy, *, causal: bool,
                  window, element_masks: bool, backward: bool) -> tuple[BlockLayout, torch.Tensor, torch.Tensor]:
    """The kernel-ready layout of the kept blocks of ``mass`` (``hf_ahfa.estimate.estimate_row_mass``), the
    fallen-back heads ``(B, H)`` and the visible blocks ``(1, 1, NQ, NK)`` (for telemetry). The reference of
    ``select_layout_of_tiles``."""
    bs = policy.block_size
    band = band_of_shape(q_len, k_len, bs, bs, causal, window, mass.device)
    keep, dense = select_blocks(mass, band[0], anchor_blocks_of_shape(q_len, k_len, policy, causal, mass.device),
                                policy.tau, policy.density_limit, bs // policy.stride)
    layout = fit_to_band(keep, None, band, bs, bs, q_len, k_len, element_masks=element_masks, backward=backward)
    return layout, dense, band[0]


def select_layout_of_tiles(tiles: tuple[torch.Tensor, torch.Tensor], q_len: int, k_len: int, policy: AdaptivePolicy,
                           *, causal: bool, window, element_masks: bool,
                           backward: bool) -> tuple[BlockLayout, torch.Tensor, torch.Tensor]:
    """``select_layout`` on the Triton kernels, from the estimator's tiles (``hf_ahfa.estimate.estimate_row_tiles``)
    instead of the mass: the same three results, without a host sync."""
    from hf_ahfa.kernels.select import select_lists

    touched, full, anchors, limit, visible = _kernel_band(q_len, k_len, policy, causal, window, tiles[0].device)
    *lists, kept = select_lists(*tiles, touched, full, anchors, limit, policy.tau, policy.block_size // policy.stride,
                                element_masks, backward)
    bs = policy.block_size
    layout = BlockLayout(block_q=bs, block_k=bs, q_len=q_len, k_len=k_len, **dict(zip(LIST_FIELDS, lists)))
    return layout, kept > limit, visible


@functools.lru_cache(maxsize=64)
def _kernel_band(q_len, k_len, policy, causal, window, device):
    """What ``select_lists`` takes of one call shape: the visible, wholly visible and anchor blocks as uint8
    ``(NQ, NK)``, the dense fallback's limit (0-d float32) and the visible blocks as ``band_of_shape`` gives them."""
    bs = policy.block_size
    touched, full = band_of_shape(q_len, k_len, bs, bs, causal, window, device)
    anchors = anchor_blocks_of_shape(q_len, k_len, policy, causal, device)
    as_bytes = [x[0, 0].contiguous().view(torch.uint8) for x in (touched, full, anchors)]
    limit = policy.density_limit * touched.sum().clamp_min(1).float()
    return (*as_bytes, limit, touched)


@functools.lru_cache(maxsize=64)
def band_of_shape(q_len, k_len, block_q, block_k, causal, window, device):
    """``band_blocks`` of one unpacked call shape, cached: built once per shape, and without the
    host-to-device copies that would make every call wait for the GPU."""
    lens = torch.full((1,), q_len, device=device), torch.full((1,), k_len, device=device)
    return band_blocks(*lens, block_q, block_k, -(-q_len // block_q), -(-k_len // block_k), causal, window)


@functools.lru_cache(maxsize=64)
def anchor_blocks_of_shape(q_len, k_len, policy, causal, device):
    return anchor_blocks(q_len, k_len, policy, causal, device)
