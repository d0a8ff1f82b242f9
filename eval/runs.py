"""Shared plumbing of the ``ahfa-eval`` commands: resumable result stores, model loading, the verdict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class ResultStore:
    """Per-item results of one command, kept in a JSON-lines file next to its report.

    Each finished item is appended (and flushed) as one line keyed by ``key``; a rerun of the same
    command skips the keys already there, so an interrupted run resumes where it stopped.
    """

    def __init__(self, path: Path, config: dict):
        self.path = Path(path)
        self.config = config
        self.items: dict[str, dict] = {}
        if self.path.exists():
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            if lines and lines[0].get("config") != config:
                raise ValueError(
                    f"{self.path} holds results of another configuration; pass another --name or delete it\n"
                    f"  stored: {lines[0].get('config')}\n  now:    {config}"
                )
            self.items = {row["key"]: row for row in lines[1:]}
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"config": config}) + "\n")

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def add(self, key: str, **values) -> dict:
        row = {"key": key, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.items[key] = row
        return row

    def rows(self) -> list[dict]:
        return list(self.items.values())


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


def load_causal_lm(model: str, attn_implementation: str, dtype: torch.dtype, device: str, gguf_file=None):
    """A causal LM and its tokenizer from a hub name or a local folder (``gguf_file`` for GGUF weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ahfa  # noqa: F401  (registers "ahfa")

    if not Path(model).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model {model!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1)")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **kw)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=attn_implementation, **kw)
    return lm.to(device).eval(), tokenizer


def relative_change(ours: float, base: float) -> float:
    """``(ours - base) / |base|``: the quantity the verdict thresholds."""
    return (ours - base) / abs(base) if base else float("inf")


def verdict(ours: float, base: float, threshold: float, higher_is_better: bool) -> dict:
    """Pass when ahfa is no worse than the baseline by more than ``threshold`` (relative)."""
    change = relative_change(ours, base)
    worse = -change if higher_is_better else change
    return {"ahfa": ours, "baseline": base, "relative_change": change, "threshold": threshold,
            "pass": worse <= threshold}
