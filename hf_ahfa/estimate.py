"""The adaptive mode's estimator: where each head's attention mass lies, per (query block, key block).

``estimate_row_mass`` samples every ``stride``-th query row (``sample_queries``) and computes each sampled
row's exact softmax over its keys summed per key block (the Triton op ``hf_ahfa::estimate_mass``, or
``estimate_mass_reference`` beside it). ``hf_ahfa.select`` keeps, per query block, the blocks its sampled rows
need.
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
    """PyTorch reference of ``hf_ahfa::estimate_mass`` (same arguments; ``window`` a pair or None)."""
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


def estimate_row_mass(q, k, call: AttnCall, policy: AdaptivePolicy, *, kernels: bool) -> torch.Tensor:
    """Mass per (sampled query row, key block) ``(B, H, ceil(Q / stride), NK)`` of an unpacked call (query
    block ``i``'s sampled rows from ``i * block_size / stride`` on); ``kernels`` runs the Triton estimator,
    else the reference."""
    Q, bs = q.shape[1], policy.block_size
    qs = sample_queries(q, policy.stride)
    if kernels:
        from hf_ahfa.kernels.estimate import estimate_mass

        a = call.kernel_args()
        return estimate_mass(qs, k, call.key_padding_mask, Q, policy.stride, bs, a["causal"], a["win_left"],
                             a["win_right"], a["softcap"], a["scale"])
    return estimate_mass_reference(qs, k, call.key_padding_mask, Q, policy.stride, bs, call.causal, call.window,
                                   call.softcap, call.scale)
