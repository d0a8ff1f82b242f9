"""Which of several implementations of one exact call is fastest on this GPU: timed once per shape key, cached.

The router asks this only for calls that every candidate computes exactly (same function up to rounding),
so the choice changes speed, never results. ``chosen()`` lists the decisions (for reports).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

_chosen: dict[tuple, str] = {}


def chosen() -> dict[str, str]:
    """The decisions so far, by shape key."""
    return {"/".join(map(str, key)): name for key, name in _chosen.items()}


def fastest(key: tuple, candidates: dict[str, Callable[[], object]], default: str) -> str:
    """The name of the fastest candidate for ``key`` (cached). While torch.compile traces or a CUDA graph is
    captured nothing can be timed: then the cached choice, else ``default``."""
    if key in _chosen:
        return _chosen[key]
    if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return default
    _chosen[key] = min(candidates, key=lambda name: _median_ms(candidates[name]))
    return _chosen[key]


def _median_ms(fn: Callable[[], object], warmup: int = 2, batches: int = 5, calls: int = 5) -> float:
    """Milliseconds per call of ``fn`` as an eager model sees it: wall time of ``calls`` back-to-back calls up to
    the GPU's end, median over ``batches``. Host time counts: a kernel that is quick on the GPU but slow to
    launch loses where the GPU work is tiny (decode), and the GPU time decides where it is not."""
    for _ in range(warmup):  # the first run of a Triton kernel compiles and tunes it
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return sorted(times)[batches // 2]
