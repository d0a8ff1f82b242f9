"""Shared plumbing of the ``ahfa-eval`` commands: resumable result stores, model loading, the verdict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hf_ahfa.eval.usage import UsageError

class ResultStore:
    """Per-item results of one command, kept in a JSON-lines file next to its report.

    Each finished item is appended (and flushed) as one line keyed by ``key``; a rerun of the same
    command skips the keys already there, so an interrupted run resumes where it stopped.

    Under ``accelerate launch`` with ``shard=True`` each process takes every ``world``-th item
    (``mine``) and keeps its own ``<stem>.rankR-of-W.jsonl``; ``gather`` waits for all processes and
    merges their items into the main process's store. With ``shard=False`` (work that the processes
    share, e.g. a distributed Trainer) only the main process writes.
    """

    def __init__(self, path: Path, config: dict, shard: bool = True):
        self.state = process_state()
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.sharded = shard and self.world > 1
        self.writer = self.sharded or self.state.is_main_process
        self.base_path = Path(path)
        self.path = self._rank_path(self.rank) if self.sharded else self.base_path
        self.config = config
        with self.state.main_process_first():  # one process creates a shared file, the others read it
            self.items = self._read(self.path, create=self.writer)

    def _rank_path(self, rank: int) -> Path:
        return self.base_path.with_name(f"{self.base_path.stem}.rank{rank}-of-{self.world}.jsonl")

    def _read(self, path: Path, create: bool) -> dict[str, dict]:
        if not path.exists():
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"config": self.config}) + "\n")
            return {}
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        stored = (lines[0].get("config") or {}) if lines else self.config
        if stored != self.config:
            changed = sorted(k for k in {*stored, *self.config} if stored.get(k) != self.config.get(k))
            raise UsageError(f"{path} holds results of another configuration (changed: {', '.join(changed)}); "
                             "pass another --name, or delete that file to start over")
        return {row["key"]: row for row in lines[1:]}

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def mine(self, index: int) -> bool:
        """Whether item number ``index`` belongs to this process."""
        return not self.sharded or index % self.world == self.rank

    def add(self, key: str, **values) -> dict:
        row = {"key": key, **values}
        if self.writer:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.items[key] = row
        return row

    def gather(self) -> bool:
        """Wait for every process; the main process then holds all items. True on the main process."""
        self.state.wait_for_everyone()
        if self.sharded and self.state.is_main_process:
            for rank in range(self.world):
                if rank != self.rank:
                    self.items.update(self._read(self._rank_path(rank), create=False))
        return self.state.is_main_process

    def rows(self) -> list[dict]:
        return list(self.items.values())


def process_state():
    """accelerate's view of this process: rank and world under ``accelerate launch``/``torchrun``
    (several CPU processes too, with ACCELERATE_USE_CPU=1), a single process otherwise."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def process_device(device: str) -> str:
    """Under ``accelerate launch`` on several GPUs, "cuda" means this process's own GPU."""
    state = process_state()
    return str(state.device) if device == "cuda" and state.num_processes > 1 else device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


def model_location(model: str) -> str:
    """``--model`` with ``~`` expanded. "org/model" is a hub name; a name that looks like a path (it starts
    with "/", "." or "~", or has more than one "/") must exist, or the hub would be asked for it."""
    name = os.path.expanduser(model)
    if not Path(name).exists() and (model.startswith(("/", ".", "~")) or model.count("/") > 1):
        raise UsageError(f"--model path {model} does not exist (no such folder)")
    return name


def load_causal_lm(model: str, attn_implementation: str, dtype: torch.dtype, device: str, gguf_file=None):
    """A causal LM and its tokenizer from a hub name or a local folder (``gguf_file`` for GGUF weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ahfa  # noqa: F401  (registers "ahfa")

    name = model_location(model)
    if gguf_file and Path(name).is_dir() and not (Path(name) / gguf_file).is_file():
        raise UsageError(f"--gguf-file {gguf_file!r}: not found in {name}")
    if not Path(name).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(f"--model {model!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1)")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kw)
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation, **kw)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"--model {model!r}: cannot load it ({type(e).__name__}: {first})") from e
    return lm.to(device).eval(), tokenizer


def plain_causal_lm(model):
    """``model``, or for a model de-quantized from GGUF (which Transformers refuses to save or fine-tune: its
    quantizer is set) the same weights, plain tensors by then, in a model built from its config without the
    quantization entry: same attention implementation, ``config.ahfa``, device and train/eval mode."""
    from transformers import AutoModelForCausalLM

    if getattr(model, "hf_quantizer", None) is None:
        return model
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype,
                                             attn_implementation=model.config._attn_implementation)
    plain.load_state_dict(model.state_dict())
    return plain.to(next(model.parameters()).device).train(model.training)


def save_causal_lm(model, tokenizer, path: Path) -> None:
    """``save_pretrained`` of the model (its ``config.ahfa`` included) and tokenizer, also for a model de-quantized
    from GGUF (``plain_causal_lm``)."""
    plain_causal_lm(model).save_pretrained(path)
    tokenizer.save_pretrained(path)


def adaptive_variants(mode: str, taus: list[float] | None, skip_masses: list[float] | None = None,
                      **extra) -> dict[str, dict]:
    """ahfa's adaptive/auto variants of a sweep: label ``ahfa-<mode>-tau<t>`` (``-skip<s>`` where ``skip_mass``
    is set) -> policy fields, one per tau (default: the policy's) and per skip mass (default: the policy's), with
    ``extra`` fields set in each. Invalid values raise ``ValueError``."""
    import hf_ahfa

    out = {}
    for tau in taus or [hf_ahfa.AdaptivePolicy().tau]:
        for skip in skip_masses or [None]:
            fields = {"mode": mode, "tau": tau, **({"skip_mass": skip} if skip else {}), **extra}
            hf_ahfa.AdaptivePolicy(**fields)
            out[f"ahfa-{mode}-tau{tau:g}" + (f"-skip{skip:g}" if skip else "")] = fields
    return out


def refuse_knobs_in_exact_mode(given: list[str], mode: str) -> None:
    """Adaptive options (``given``: their names as typed) under ``--mode exact`` would be dropped: refuse them."""
    if given and mode == "exact":
        raise UsageError(f"{', '.join(given)} set the adaptive mode, which --mode exact does not run; pass --mode "
                         "adaptive or auto")


def check_skip_mass(skip_masses: list[float] | None, device: str) -> None:
    """In-kernel skipping (``--skip-mass``) runs on the Triton kernels only: refuse it where the adaptive calls would
    take the reference backend, which computes every kept tile (the variant would measure nothing)."""
    from hf_ahfa.router import requested_backend

    backend = requested_backend(None) or ("triton" if str(device).startswith("cuda") else "reference")
    if any(skip_masses or []) and backend != "triton":
        raise UsageError(f"--skip-mass: in-kernel skipping runs on the Triton kernels (CUDA, or AHFA_BACKEND=triton "
                         f"on the CPU); on {device} this run's adaptive calls take the {backend} backend, which "
                         "computes every kept tile")


def relative_change(ours: float, base: float) -> float:
    """``(ours - base) / |base|``: the quantity the verdict thresholds."""
    return (ours - base) / abs(base) if base else float("inf")


def verdict(ours: float, base: float, threshold: float, higher_is_better: bool) -> dict:
    """Pass when ahfa is no worse than the baseline by more than ``threshold`` (relative)."""
    change = relative_change(ours, base)
    worse = -change if higher_is_better else change
    return {"ahfa": ours, "baseline": base, "relative_change": change, "threshold": threshold,
            "pass": worse <= threshold}
