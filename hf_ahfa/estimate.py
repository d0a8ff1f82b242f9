"""The adaptive mode's estimator: where each head's attention mass lies, per (query block, key block).

``estimate_row_mass`` samples every ``stride``-th query row (``sample_queries``) and computes each sampled
row's exact softmax over its keys summed per key block (``estimate_mass_reference``; on the Triton kernels
``estimate_row_tiles``, each row's tiles before the softmax, which the selection kernel reads). ``hf_ahfa.select``
keeps, per query block, the blocks its sampled rows need.
"""

from __future__ import annotations

import torch

from hf_ahfa.masks import positions_visible
from hf_ahfa.policy import AdaptivePolicy
from hf_ahfa.spec import AttnCall


def sample_queries(q: torch.Tensor, stride: int) -> torch.Tensor:
    """``q (B, Q, H, D)`` -> ``(B, ceil(Q / stride), H, D)``: rows ``min(r * stride + stride - 1, Q - 1)``."""
    rows = torch.clamp(torch.arange(stride - 1, q.shape[1] + stride - 1, stride, device=q.device), max=q.shape[1] - 1)
    return q[:, rows]


def estimate_mass_reference(qs, k, key_padding_mask, q_len, stride, block_k, causal, window, softcap, scale):
    """PyTorch reference of ``hf_ahfa.kernels.estimate.estimate_mass`` (same arguments; ``window`` a pair or None)."""
    B, NR, H, D = qs.shape
    K = k.shape[1]
    kk = k.float().repeat_interleave(H // k.shape[2], dim=2)  # a reference favours clarity over memory
    s = torch.einsum("brhd,bkhd->bhrk", qs.float(), kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    r = torch.arange(NR, device=qs.device)[:, None]
    pos = torch.clamp(r * stride + stride - 1, max=q_len - 1) + (K - q_len)
    ok = positions_visible(pos, torch.arange(K, device=qs.device)[None, :], causal=causal, window=window)[None, None]
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
    nk = -(-K // block_k)
    p = torch.nn.functional.pad(p, (0, nk * block_k - K))
    return p.view(B, H, NR, nk, block_k).sum(-1)


def estimate_row_mass(q, k, call: AttnCall, policy: AdaptivePolicy) -> torch.Tensor:
    """Mass per (sampled query row, key block) ``(B, H, ceil(Q / stride), NK)`` of an unpacked call (query
    block ``i``'s sampled rows from ``i * block_size / stride`` on), by the reference."""
    return estimate_mass_reference(sample_queries(q, policy.stride), k, call.key_padding_mask, q.shape[1],
                                   policy.stride, policy.block_size, call.causal, call.window, call.softcap, call.scale)


def estimate_row_tiles(q, k, call: AttnCall, policy: AdaptivePolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """``estimate_row_mass`` before its softmax, by the Triton op ``hf_ahfa::estimate_tiles``: per (sampled row,
    key block) the row's largest logit there and its sum of exponentials, two ``(B, H, ceil(Q / stride), NK)``
    (what ``hf_ahfa.select.select_layout_of_tiles`` takes)."""
    from hf_ahfa.kernels.estimate import estimate_tiles

    a = call.kernel_args()
    return estimate_tiles(sample_queries(q, policy.stride), k, call.key_padding_mask, q.shape[1], policy.stride,
                          policy.block_size, a["causal"], a["win_left"], a["win_right"], a["softcap"], a["scale"])
