"""Launch wrapper of the estimator kernel, registered as the PyTorch op ``hf_ahfa::estimate_tiles``; ``estimate_mass``
turns its tiles into each sampled row's mass per key block."""

from __future__ import annotations

import torch

from hf_ahfa.kernels import configs
from hf_ahfa.kernels.estimate_kernels import estimate_mass_kernel
from hf_ahfa.kernels.common import Scores, cdiv, mask_args, precision, tensor_arg
from hf_ahfa.kernels.flash import LOG2E
from hf_ahfa.kernels.launch import launch

# key blocks per estimator program: its rows' tile is loaded once per chunk (1: once per key block, as before the
# twenty-third session), halved while fewer than MIN_PROGRAMS programs would run (short calls keep the GPU filled:
# ~16 per SM of an H100; 32K tokens and 14 heads keep all 16: 7168 programs)
ESTIMATE_CHUNK = 16
MIN_PROGRAMS = 2048


def estimate_chunk(programs: int) -> int:
    """Key blocks per program for a call that would run ``programs`` programs at one key block each."""
    chunk = ESTIMATE_CHUNK
    while chunk > 1 and programs // chunk < MIN_PROGRAMS:
        chunk //= 2
    return chunk


@torch.library.custom_op("hf_ahfa::estimate_tiles", mutates_args=(), device_types=("cuda", "cpu"))
def estimate_tiles(
    qs: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None, q_len: int, stride: int,
    block_k: int, causal: bool, win_left: int, win_right: int, softcap: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sampled query row, key block): the row's largest logit in the block (log2 domain, ``-inf`` where it
    sees none of it) and its sum of ``exp2(logit - that max)``, two ``(B, H, NR, ceil(K / block_k))`` float32.

    ``qs (B, NR, H, D)``: query rows ``min(r * stride + stride - 1, q_len - 1)`` of a ``q_len``-row call
    (``hf_ahfa.estimate.sample_queries``), aligned bottom-right against ``k (B, K, Hkv, D)``.
    """
    B, NR, H, D = qs.shape
    K, HKV = k.shape[1], k.shape[2]
    nkb = cdiv(K, block_k)
    tile_max = torch.full((B, H, NR, nkb), float("-inf"), dtype=torch.float32, device=qs.device)
    tile_sum = torch.zeros(B, H, NR, nkb, dtype=torch.float32, device=qs.device)
    block_r = 16 if configs.interpreting() else 64
    chunk = estimate_chunk(cdiv(NR, block_r) * nkb * B * H)
    launch(estimate_mass_kernel, (cdiv(NR, block_r), cdiv(nkb, chunk), B * H),
           (tensor_arg(qs), tensor_arg(k), mask_args(key_padding_mask, None)[0], tile_max, tile_sum,
            NR, q_len, K, H, H // HKV, nkb, stride, Scores(scale * LOG2E, softcap, win_left, win_right)),
           dict(D=D, CAUSAL=causal, PRECISION=precision(qs.dtype), BLOCK_R=block_r, BLOCK_N=block_k,
                CHUNK=chunk, num_warps=1 if configs.interpreting() else 4,
                # two key tiles in flight where they fit sm80's shared memory with room to spare
                num_stages=1 if configs.interpreting() or block_k * D > 128 * 128 else 2))
    return tile_max, tile_sum


@estimate_tiles.register_fake
def _(qs, k, key_padding_mask, q_len, stride, block_k, causal, win_left, win_right, softcap, scale):
    B, NR, H, _ = qs.shape
    shape = (B, H, NR, -(-k.shape[1] // block_k))
    return qs.new_empty(shape, dtype=torch.float32), qs.new_empty(shape, dtype=torch.float32)


def estimate_mass(qs, k, key_padding_mask, q_len, stride, block_k, causal, win_left, win_right, softcap, scale):
    """Attention mass per (sampled query row, key block): ``(B, H, NR, ceil(K / block_k))`` float32, each row
    summing to 1 over the blocks it sees (0 where it sees nothing); arguments as ``estimate_tiles``."""
    return mass_of_tiles(*estimate_tiles(qs, k, key_padding_mask, q_len, stride, block_k, causal, win_left,
                                         win_right, softcap, scale))


def mass_of_tiles(tile_max: torch.Tensor, tile_sum: torch.Tensor) -> torch.Tensor:
    """Each row's softmax mass per block from ``estimate_tiles``: each tile's sum rescaled to the row's max, over the
    row's total."""
    row_max = tile_max.amax(-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    mass = tile_sum * torch.exp2(tile_max - row_max)
    return mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
