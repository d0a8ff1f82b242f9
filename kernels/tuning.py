"""Launch a kernel with the configuration chosen once per shape key: the fastest of the short candidate list
of ``configs`` (timed), or with ``AHFA_AUTOTUNE=0`` the first that fits (untimed)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Callable

logger = logging.getLogger("hf_ahfa")

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
            ok, ms = _attempt(lambda: do_bench(lambda: launch(cfg), warmup=5, rep=20), cfg, key)
            if ok:
                times[cfg] = ms
        if times:
            _chosen[key] = min(times, key=times.get)
            return launch(_chosen[key])
    else:
        for cfg in candidates:
            if _attempt(lambda: launch(cfg), cfg, key)[0]:
                _chosen[key] = cfg
                return
    raise RuntimeError(f"hf_ahfa: no launch configuration of {candidates} fits this GPU (or compiles) for {key}")


def _attempt(run: Callable[[], object], cfg: tuple, key: tuple) -> tuple[bool, object]:
    """``(True, run())``, or ``(False, None)`` where ``cfg`` does not fit (``_does_not_fit``). Triton prints a
    failing kernel's whole PTX on stdout before it raises PTXASError: what the compile prints is held back and
    given out only if it succeeded; a ptxas failure becomes one warning naming the candidate."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            result = run()
    except Exception as err:  # noqa: BLE001
        if not _does_not_fit(err):
            sys.stdout.write(held.getvalue())
            raise
        if type(err).__name__ == "PTXASError":
            logger.warning("hf_ahfa: ptxas failed on launch config %s of %s (skipped): %s", cfg, key,
                           str(err).strip().splitlines()[0])
        return False, None
    sys.stdout.write(held.getvalue())
    return True, result
