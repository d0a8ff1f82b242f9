"""Pick a launch configuration once per shape key by timing the short candidate list of ``configs``."""

from __future__ import annotations

from typing import Callable

from hf_ahfa.kernels.configs import Config

_chosen: dict[tuple, Config] = {}


def chosen() -> dict[str, Config]:
    """The configurations picked so far, by shape key (for benchmark reports)."""
    return {"/".join(map(str, key)): cfg for key, cfg in _chosen.items()}


def pick(key: tuple, candidates: list[Config], launch: Callable[[Config], None]) -> Config:
    """The fastest of ``candidates`` for ``key`` (cached); a single candidate is returned untimed.

    ``launch(cfg)`` must be safe to repeat (the kernels write their outputs, never accumulate into them).
    A candidate that fails to compile (e.g. too much shared memory) is skipped.
    """
    if len(candidates) == 1:
        return candidates[0]
    if key not in _chosen:
        from triton.testing import do_bench

        times = {}
        for cfg in candidates:
            try:
                times[cfg] = do_bench(lambda: launch(cfg), warmup=5, rep=20)
            except Exception as err:  # noqa: BLE001 - resource limits surface as various compiler errors
                if "out of resource" not in str(err).lower() and "shared memory" not in str(err).lower():
                    raise
        if not times:
            raise RuntimeError(f"hf_ahfa: no launch configuration of {candidates} fits this GPU for {key}")
        _chosen[key] = min(times, key=times.get)
    return _chosen[key]
