"""Which of several implementations of one exact call is fastest on this device: timed once per shape key, cached.

The router asks this for calls that every candidate computes exactly (same function up to rounding), where the
choice changes speed, never results, and for ``mode="auto"``, which asked for block-sparse attention where it
pays: whether its selection or exact attention runs a layer's calls of a shape. ``chosen()`` lists the decisions
(for reports), ``measured()`` the times behind them.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

_times: dict[tuple, dict[str, float]] = {}
_decided: dict[tuple, str] = {}


def chosen() -> dict[str, str]:
    """The decisions so far, by shape key."""
    return {"/".join(map(str, key)): name for key, name in _decided.items()}


Candidates = Callable[[], dict[str, Callable[[], object]]]


def measured() -> dict[str, dict[str, float]]:
    """Milliseconds per call of each timed candidate, by shape key (for reports)."""
    return {"/".join(map(str, key)): times for key, times in _times.items()}


def fastest(key: tuple, candidates: Candidates, default: str, *, device: torch.device,
            incumbent: str | None = None, margin: float = 0.0) -> str:
    """The name of the fastest candidate for ``key`` (cached), each running on ``device``. ``candidates`` makes
    the ``{name: no-argument callable}`` to time, called only for a key not timed yet (so that a decided call
    builds nothing). ``incumbent`` (a candidate) keeps the call unless another was timed more than ``margin`` (a
    fraction) faster. While torch.compile traces or a CUDA graph is captured nothing can be timed: then the
    cached choice, else ``default``."""
    if key in _decided:
        return _decided[key]
    times = timings(key, candidates, device)
    if times is None:
        return default
    if key not in _decided:
        best = min(times, key=times.get)
        if incumbent is not None and times[best] > (1.0 - margin) * times[incumbent]:
            best = incumbent
        _decided[key] = best
    return _decided[key]


def prefer(names: tuple[str, ...]) -> int:
    """Where one of ``names`` was among a decided key's timed candidates, decide the fastest of those instead (an
    A/B of routes on a model: the decision timed back-to-back against another that a whole model's run may
    favour). Returns how many decisions changed; keys decided later are timed as usual."""
    changed = 0
    for key, times in _times.items():
        among = [name for name in times if name in names]
        if among and key in _decided and _decided[key] not in among:
            _decided[key] = min(among, key=times.get)
            changed += 1
    return changed


def timings(key: tuple, candidates: Candidates, device: torch.device) -> dict[str, float] | None:
    """Milliseconds per call of each candidate that ``candidates()`` makes for ``key`` on ``device`` (timed on
    the first ask, cached); ``None`` where nothing was timed yet and nothing can be (torch.compile tracing, CUDA
    graph capture)."""
    if key in _times:
        return _times[key]
    if not host_may_wait():
        return None
    _times[key] = _median_ms(candidates(), device)
    return _times[key]


def host_may_wait() -> bool:
    """False while torch.compile traces or a CUDA graph is captured: then nothing may be timed or read back."""
    # (tracing first: Dynamo cannot trace the capture test, and a traced call must not reach it)
    return not (torch.compiler.is_compiling() or cuda_graph_capturing())


def cuda_graph_capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (not to be asked while torch.compile traces)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _median_ms(candidates: dict[str, Callable[[], object]], device: torch.device, warmup: int = 1,
               batches: int = 5, batch_ms: float = 2.0) -> dict[str, float]:
    """Milliseconds per call of each candidate as an eager model sees it: wall time of back-to-back calls up to
    the device's end, median over ``batches``, the candidates taking turns batch by batch (so that the host's
    drift does not favour one). Host time counts: a kernel that is quick on the GPU but slow to launch loses
    where the GPU work is tiny (decode), and the GPU time decides where it is not. Each batch lasts about
    ``batch_ms`` (3 to 20 calls on a GPU, whose launches queue; 1 to 20 on the CPU). Where a single call
    already lasts ``batch_ms`` (a long prompt: the device's time decides, and its spread is far below the
    router's margins) it is three single calls: a model pays the whole timing in the first call of a shape (of
    each layer, in auto mode), which at 128K tokens had been 18 runs of each candidate."""
    cuda = torch.device(device).type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for fn in candidates.values():
        for _ in range(warmup):  # the first run of a Triton kernel compiles and tunes it
            fn()
    sync()
    single = []
    for fn in candidates.values():  # (a second warm run, and the length of a call)
        start = time.perf_counter()
        fn()
        sync()
        single.append((time.perf_counter() - start) * 1e3)
    if max(single) >= batch_ms:
        calls, batches = 1, 3
    else:
        calls = max(3 if cuda else 1, min(20, math.ceil(batch_ms / max(max(single), 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(batches):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3 / calls)
    return {name: sorted(ts)[batches // 2] for name, ts in times.items()}
