"""Launch a kernel with the configuration chosen once per shape key: the fastest of the short candidate list
of ``configs`` (timed), or with ``AHFA_AUTOTUNE=0`` the first that fits (untimed)."""

from __future__ import annotations

import os
from typing import Callable

# AHFA_AUTOTUNE=0: each table's first configuration that fits, untimed: a quarter of the compiles on a cold
# cache (GPU test runs) and launch choices that do not depend on timing noise.
_AUTOTUNE = os.environ.get("AHFA_AUTOTUNE", "1") != "0"

# a candidate: a table entry (kernels/configs.py), with the launch's own options appended where it has some (the
# forward's load mode)
_chosen: dict[tuple, tuple] = {}


def chosen() -> dict[str, tuple]:
    """The configurations picked so far, by shape key (for benchmark reports)."""
    return {"/".join(map(str, key)): cfg for key, cfg in _chosen.items()}


def _does_not_fit(err: Exception) -> bool:
    """A configuration this GPU cannot run, raised before the kernel runs: resource limits (various compiler
    errors), or ptxas failing on it (triton 3.6's ptxas crashes with SIGSEGV on some forward variants with
    sinks, a mask and causal at (128, 128, 8, 3): GPU fuzz configurations 133, 430, 434)."""
    text = str(err).lower()
    return "out of resource" in text or "shared memory" in text or type(err).__name__ == "PTXASError"


def launch_tuned(key: tuple, candidates: list[tuple], launch: Callable[[tuple], None]) -> None:
    """``launch`` with the configuration chosen for ``key`` (chosen on the first call, then cached).

    ``key`` must name everything that changes what a configuration needs (dtype, head dims, the kernel's
    compile-time variant), so that a choice never meets a launch it does not fit. ``launch(cfg)`` must be
    safe to repeat (the kernels write their outputs, never accumulate into them). Candidates that do not fit
    the GPU (shared memory, registers) or that ptxas fails to compile are skipped.
    """
    if key in _chosen:
        return launch(_chosen[key])
    if _AUTOTUNE and len(candidates) > 1:
        from triton.testing import do_bench

        times = {}
        for cfg in candidates:
            try:
                times[cfg] = do_bench(lambda: launch(cfg), warmup=5, rep=20)
            except Exception as err:  # noqa: BLE001
                if not _does_not_fit(err):
                    raise
        if times:
            _chosen[key] = min(times, key=times.get)
            return launch(_chosen[key])
    else:
        for cfg in candidates:
            try:
                launch(cfg)
            except Exception as err:  # noqa: BLE001
                if not _does_not_fit(err):
                    raise
                continue
            _chosen[key] = cfg
            return
    raise RuntimeError(f"hf_ahfa: no launch configuration of {candidates} fits this GPU (or compiles) for {key}")
