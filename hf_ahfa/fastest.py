"""Which of several implementations of one exact call is fastest on this GPU: timed once per shape key, cached.

The router asks this only for calls that every candidate computes exactly (same function up to rounding),
so the choice changes speed, never results. ``chosen()`` lists the decisions (for reports).
"""

from __future__ import annotations

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


def _median_ms(fn: Callable[[], object], warmup: int = 2, reps: int = 7) -> float:
    for _ in range(warmup):  # the first run of a Triton kernel compiles and tunes it
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]
