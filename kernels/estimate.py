"""Launch wrapper of the estimator kernel, registered as the PyTorch op ``hf_ahfa::estimate_mass``."""

from __future__ import annotations

import torch
import triton

from hf_ahfa.kernels import configs
from hf_ahfa.kernels.estimate_kernels import estimate_mass_kernel
from hf_ahfa.kernels.flash import LOG2E

BLOCK_R = 16  # pooled rows per program: the smallest tile tl.dot takes


@torch.library.custom_op("hf_ahfa::estimate_mass", mutates_args=(), device_types=("cuda", "cpu"))
def estimate_mass(
    qbar: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None, q_len: int, pool: int,
    block_k: int, causal: bool, win_left: int, win_right: int, softcap: float, scale: float,
) -> torch.Tensor:
    """Estimated attention mass per (pooled query, key block): ``(B, H, NR, ceil(K / block_k))`` float32.

    ``qbar (B, NR, H, D)``: means of ``pool`` consecutive query rows (of a ``q_len``-row call, aligned
    bottom-right against ``k (B, K, Hkv, D)``); each pooled row sees the keys any of its queries sees.
    Rows sum to 1 over their visible keys (0 where a row sees nothing).
    """
    B, NR, H, D = qbar.shape
    K, HKV = k.shape[1], k.shape[2]
    nkb = triton.cdiv(K, block_k)
    est = torch.zeros(B, H, NR, nkb, dtype=torch.float32, device=qbar.device)
    kpm = None if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    estimate_mass_kernel[(triton.cdiv(NR, BLOCK_R), B * H)](
        qbar, k, kpm if kpm is not None else est, est, *qbar.stride(), *k.stride(),
        *((kpm.stride(0), kpm.stride(1)) if kpm is not None else (0, 0)),
        NR, q_len, K, H, H // HKV, nkb, pool, D, scale * LOG2E, softcap, win_left, win_right,
        CAUSAL=causal, HAS_WINDOW=win_left >= 0, SOFTCAP=softcap > 0, HAS_KPM=kpm is not None,
        PRECISION="ieee" if qbar.dtype == torch.float32 else "tf32", BLOCK_R=BLOCK_R, BLOCK_N=block_k,
        BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=1 if configs.interpreting() else 4, num_stages=2,
    )
    return est


@estimate_mass.register_fake
def _(qbar, k, key_padding_mask, q_len, pool, block_k, causal, win_left, win_right, softcap, scale):
    B, NR, H, _ = qbar.shape
    return qbar.new_empty(B, H, NR, -(-k.shape[1] // block_k), dtype=torch.float32)
