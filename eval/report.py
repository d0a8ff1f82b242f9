"""Results as data: JSON with the run's provenance, a Markdown summary, and plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def provenance() -> dict:
    """GPU, library versions, git commit and date of this run."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("AHFA_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                    cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, meta: dict, rows: list[dict], **extra) -> None:
    write_atomic(path, json.dumps({"meta": meta, **extra, "rows": rows}, indent=1) + "\n")


def paired_change(test: list[float], base: list[float], rounds: int = 2000, seed: int = 0) -> dict:
    """Relative change of the mean of ``test`` over the mean of ``base`` (paired values: the same training steps,
    or calls timed in turn) and its 95% paired bootstrap interval, the pairs resampled with replacement."""
    t, b = torch.tensor(test, dtype=torch.float64), torch.tensor(base, dtype=torch.float64)
    pick = torch.randint(len(t), (rounds, len(t)), generator=torch.Generator().manual_seed(seed))
    changes = t[pick].mean(1) / b[pick].mean(1) - 1
    lo, hi = torch.quantile(changes, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return dict(change=float(t.mean() / b.mean() - 1), low=lo, high=hi)


def or_na(value):
    """``value``, or "n/a" where the figure does not exist (an exact run's kept blocks, CPU peak memory)."""
    return "n/a" if value is None else value


def markdown_table(headers: list[str], lines: list[list]) -> str:
    fmt = lambda x: "" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(x) for x in line) + " |" for line in lines]
    return "\n".join(out)
