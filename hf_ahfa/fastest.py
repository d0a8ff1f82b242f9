"""Which of several implementations of one exact call is fastest on this GPU: timed once per shape key, cached.

The router asks this only for calls that every candidate computes exactly (same function up to rounding),
so the choice changes speed, never results. ``chosen()`` lists the decisions (for reports).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

_times: dict[tuple, dict[str, float]] = {}


def chosen() -> dict[str, str]:
    """The decisions so far, by shape key."""
    return {"/".join(map(str, key)): min(times, key=times.get) for key, times in _times.items()}


def fastest(key: tuple, candidates: dict[str, Callable[[], object]], default: str) -> str:
    """The name of the fastest candidate for ``key`` (cached). While torch.compile traces or a CUDA graph is
    captured nothing can be timed: then the cached choice, else ``default``."""
    times = timings(key, candidates)
    return default if times is None else min(times, key=times.get)


def timings(key: tuple, candidates: dict[str, Callable[[], object]]) -> dict[str, float] | None:
    """Milliseconds per call of each candidate for ``key`` (timed on the first ask, cached); ``None`` where
    nothing was timed yet and nothing can be (torch.compile tracing, CUDA graph capture)."""
    if key in _times:
        return _times[key]
    if not host_may_wait():
        return None
    _times[key] = {name: _median_ms(fn) for name, fn in candidates.items()}
    return _times[key]


def host_may_wait() -> bool:
    """False while torch.compile traces or a CUDA graph is captured: then nothing may be timed or read back."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not (torch.compiler.is_compiling() or capturing)


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
