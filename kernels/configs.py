"""Launch configurations of the flash kernels: one table per kernel family, keyed by architecture
and head-dim bucket. Each entry is a short candidate list ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``;
the first is the default, the rest are tried once per shape by ``tuning.launch_tuned``.
"""

from __future__ import annotations

import functools
import os

import torch

Config = tuple[int, int, int, int]

# Under TRITON_INTERPRET the kernels run on numpy: small tiles keep CPU tests fast.
INTERPRETER: Config = (16, 16, 1, 1)

FWD: dict[str, dict[int, list[Config]]] = {
    "sm90": {
        64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3)],
        128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3)],
        # 128-row tiles over two warpgroups (FA3's D=256 shape): (128, 64, 8, 2) ran 1.5-1.7x the former default
        # (64, 64, 4, 2), 0.83x / 0.90x cuDNN at 8K / 16K (H100, Gemma-3's 4/1 heads: eval/results/fwd-d256-*-h100.md);
        # (128, 64, 4, 2) ran 5x slower than it (one warpgroup spills) and is left out
        256: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2)],
    },
    "sm80": {
        64: [(128, 64, 4, 3), (64, 64, 4, 3)],
        128: [(128, 32, 4, 3), (64, 64, 4, 3)],
        256: [(64, 32, 4, 2), (32, 32, 4, 2)],
    },
}

# dk/dv kernel: BLOCK_N keys held, BLOCK_M queries streamed; dq kernel: the transpose.
# With triton 3.6 on an H200 these compute wrong dk in bf16/fp16 (the interpreter, with the same tiles, is right),
# so they are out of the table: (64, 128, 8, 2) at head dim 64 (GPU fuzz configuration 504, every run:
# eval/results/gpu-fuzz-504-h200.log); (32, 128, 4, 2) at head dim 64 and (32, 128, 8, 2) at head dim 128
# (relative dk error 0.01-0.65 against 0.004 for the others, with and without ALiBi; one misaligned-address
# crash: eval/results/bwd-config-check-*-h200.md). The autotuner could pick them: every entry here is checked
# pinned by the GPU test test_every_launch_config_is_right.
BWD: dict[str, dict[int, list[Config]]] = {
    "sm90": {
        64: [(64, 128, 8, 3), (64, 64, 4, 2)],
        128: [(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3)],
        # two warpgroups: (128, 64, 8, 1) fwd+bwd 0.67x cuDNN at 8K, 1.17x (64, 64, 8, 2) (0.57x, which ran 2.0x
        # the former default (32, 64, 4, 1)); H100, Gemma-3's 4/1 heads: eval/results/bwd-d256-*-h100.md
        256: [(128, 64, 8, 1), (64, 64, 8, 2), (64, 64, 8, 1), (32, 32, 4, 1), (32, 64, 4, 1)],
    },
    "sm80": {
        64: [(64, 64, 4, 2), (32, 64, 4, 2)],
        128: [(32, 64, 4, 2), (64, 64, 4, 2)],
        256: [(16, 32, 4, 1), (32, 32, 4, 1)],
    },
}

# float32 inputs: tl.dot in exact float32 (input_precision "ieee") is multiply-adds unrolled on the CUDA cores, and
# with the 16-bit tables' tiles ptxas took 31 / 101 / 249 s for one causal forward+backward at head dim 64 / 128 /
# 256 (the first entries; 37 s for the forward alone at 256 with a time limit it never met in a 32K fine-tune's
# float32 calls); these tiles 6 / 13 / 57 s (sm90, triton 3.6, compiled offline: kernels/NOTES.md). One entry
# each: a tuned candidate costs its compile. Not yet timed on a GPU.
FWD_FLOAT32: dict[str, dict[int, list[Config]]] = {
    "sm90": {64: [(64, 32, 4, 2)], 128: [(64, 32, 4, 2)], 256: [(64, 32, 4, 2)]},
    "sm80": {64: [(64, 32, 4, 2)], 128: [(64, 32, 4, 2)], 256: [(32, 32, 4, 1)]},
}
BWD_FLOAT32: dict[str, dict[int, list[Config]]] = {
    "sm90": {64: [(32, 32, 4, 1)], 128: [(32, 32, 4, 1)], 256: [(32, 32, 4, 1)]},
    "sm80": {64: [(32, 32, 4, 1)], 128: [(32, 32, 4, 1)], 256: [(32, 32, 4, 1)]},
}

# split-KV decode: (BLOCK_N, num_warps, num_stages) in the order tried; BLOCK_M is the query rows that share
# a k/v head (GQA group x queries, up to 128), so that a wide group at head dim 256 needs the smaller tiles.
# Every BLOCK_N divides the first, the granularity of the splits.
DECODE: list[tuple[int, int, int]] = [(64, 4, 3), (64, 4, 2), (32, 4, 2), (32, 4, 1)]
DECODE_INTERPRETER = [(16, 4, 1)]


# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when this package is imported.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    """Whether the kernels of this process were defined for Triton's CPU interpreter."""
    return _INTERPRETING


@functools.cache
def arch(device: torch.device) -> str:
    """``sm90`` (Hopper and newer) or ``sm80`` (Ampere, Ada): the launch tables' key. Read once per device: the
    property lookup costs ~10 us of host time, and every launch asks."""
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "sm90"
    if major >= 8:
        return "sm80"
    raise RuntimeError(f"hf_ahfa kernels need compute capability 8.0 or newer, got {major}.x on {device}")


def bucket(head_dim: int) -> int:
    """The head-dim key of the tables."""
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def candidates(table: dict[str, dict[int, list[Config]]], device: torch.device, head_dim: int) -> list[Config]:
    if interpreting():
        return [INTERPRETER]
    return table[arch(device)][bucket(head_dim)]
