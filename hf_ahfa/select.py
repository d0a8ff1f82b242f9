"""The adaptive mode's selection: which key blocks each query block keeps, as a ``BlockLayout``.

Per (batch, head, query block) the fewest key blocks whose estimated mass reaches ``tau``, plus the
anchors (sink and local blocks); a head whose selection is denser than ``density_limit`` keeps all its
visible blocks (per-head fallback). Block geometry per call shape is cached, built without host syncs.
"""

from __future__ import annotations

import functools

import torch

from hf_ahfa.block_layout import BlockLayout, band_blocks, fit_to_band
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
                  density_limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept blocks ``(B, H, NQ, NK)`` bool and the heads that fell back to all blocks ``(B, H)``.

    ``mass (B, H, NQ, NK)``: estimated mass per block; ``touched``: the blocks any query can see;
    ``anchors``: blocks always kept. Per query block, blocks are taken by descending mass until the
    mass already taken reaches ``tau`` (of the mass on visible blocks).
    """
    touched = touched.expand_as(mass)
    m = mass.masked_fill(~touched, 0.0)
    m = m / m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    if tau >= 1.0:
        keep = touched.clone()
    else:
        vals, order = m.sort(-1, descending=True)
        taken_before = vals.cumsum(-1) - vals
        keep = torch.zeros_like(touched).scatter(-1, order, taken_before < tau)
        keep = (keep | anchors) & touched
    visible = touched.sum((2, 3)).clamp_min(1)
    dense = keep.sum((2, 3)) > density_limit * visible
    keep = torch.where(dense[..., None, None], touched, keep)
    return keep, dense


def select_layout(mass: torch.Tensor, q_len: int, k_len: int, policy: AdaptivePolicy, *, causal: bool,
                  window, element_masks: bool, backward: bool) -> tuple[BlockLayout, torch.Tensor, torch.Tensor]:
    """The kernel-ready layout of the kept blocks, the fallen-back heads ``(B, H)`` and the visible blocks
    ``(1, 1, NQ, NK)`` (for telemetry)."""
    bs = policy.block_size
    band = band_of_shape(q_len, k_len, bs, bs, causal, window, mass.device)
    keep, dense = select_blocks(mass, band[0], anchor_blocks_of_shape(q_len, k_len, policy, causal, mass.device),
                                policy.tau, policy.density_limit)
    layout = fit_to_band(keep, None, band, bs, bs, q_len, k_len, element_masks=element_masks, backward=backward)
    return layout, dense, band[0]


@functools.lru_cache(maxsize=64)
def band_of_shape(q_len, k_len, block_q, block_k, causal, window, device):
    """``band_blocks`` of one unpacked call shape, cached: built once per shape, and without the
    host-to-device copies that would make every call wait for the GPU."""
    lens = torch.full((1,), q_len, device=device), torch.full((1,), k_len, device=device)
    return band_blocks(*lens, block_q, block_k, -(-q_len // block_q), -(-k_len // block_k), causal, window)


@functools.lru_cache(maxsize=64)
def anchor_blocks_of_shape(q_len, k_len, policy, causal, device):
    return anchor_blocks(q_len, k_len, policy, causal, device)
