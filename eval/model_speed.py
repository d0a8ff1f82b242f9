"""Whole-model speed and memory: prefill (time to first token, peak memory), decode tokens/s (greedy steps
on the prefill's cache, timed alone) and a training step, ``ahfa`` against a baseline implementation on the
same model in the same run, with the complexity analyzer's predictions beside the measurements.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import hf_ahfa
from hf_ahfa.eval.report import markdown_table, or_na, paired_change, provenance, write_atomic, write_json


def predict(config, seq_len: int, dtype_bytes: int, impl: str) -> dict:
    """Attention cost of one causal prefill of ``seq_len`` tokens, summed over layers.

    FLOPs ``4 H L^2 D / 2`` per layer (sliding layers see at most ``W`` keys per query); bytes: q, k, v,
    o read or written once (flash-style) or, for eager, also the ``H L^2`` score/probability matrix
    written and read twice; extra memory: eager holds that matrix, flash kernels O(L).
    """
    text = getattr(config, "get_text_config", lambda: config)()
    H = text.num_attention_heads
    D = getattr(text, "head_dim", None) or text.hidden_size // H
    Hkv = getattr(text, "num_key_value_heads", H) or H
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    window = getattr(text, "sliding_window", None)
    flops = bytes_ = extra = 0
    for kind in layer_types:
        keys = min(seq_len, window) if kind == "sliding_attention" and window else seq_len
        pairs = seq_len * keys - (keys * (keys - 1)) // 2  # visible (query, key) pairs, causal
        flops += 4 * H * pairs * D
        io = (2 * H + 2 * Hkv) * seq_len * D * dtype_bytes
        if impl == "eager":
            io += 4 * H * seq_len * seq_len * dtype_bytes
            extra = max(extra, 2 * H * seq_len * seq_len * dtype_bytes)
        bytes_ += io
    return {"attn_flops": flops, "attn_bytes": bytes_, "attn_extra_memory": extra}


def _timed(fn, device, repeat: int = 3, min_seconds: float = 0.25,
           max_repeat: int = 25) -> tuple[float, int | None]:
    """Median seconds of calls of ``fn()`` after one warm-up: at least ``repeat`` calls, more (up to
    ``max_repeat``) until ``min_seconds`` were spent, so that a short, host-bound call (a 1K prefill of a small
    model takes ~15 ms) is not judged on three samples; and the peak allocated bytes (None off CUDA: PyTorch
    tracks no peak of CPU allocations)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    while len(times) < repeat or (sum(times) < min_seconds and len(times) < max_repeat):
        times.append(_seconds(fn, device))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return statistics.median(times), peak


def measure(model, impls, seq_lens, decode_tokens=64, train=True, vocab=None, progress=True, policies=None,
            tokens=None, rounds=1, last_logits=False) -> list[dict]:
    """One row per (implementation, length): prefill seconds and peak memory, decode tokens/s, and the
    time of one forward+backward step on ``L`` tokens (``train``).

    ``impls`` are labels: Transformers implementations, or keys of ``policies`` mapping a label to
    ``(implementation, ahfa policy fields)`` (e.g. ahfa in adaptive mode). ``tokens``: real token ids to
    take the first ``L`` of (random ids otherwise: attention sparsity then means little). ``rounds``: the
    implementations are measured that many times in alternating order (A B, B A, ...), so that drift (clocks,
    caches, the machine's load) does not favour whichever runs first; each time is the median over rounds,
    the single rounds kept in ``<metric>_runs``. ``last_logits``: the timed prefill computes the last
    position's logits only (``logits_to_keep=1``, as ``generate`` prefills), else every position's.
    """
    device = next(model.parameters()).device
    policies = policies or {}
    inputs = _inputs(model, seq_lens, vocab, tokens)
    runs: dict[tuple[str, int], list[dict]] = {(label, L): [] for L in seq_lens for label in impls}
    jobs = [(label, L) for r in range(rounds) for L in seq_lens for label in _turn(impls, r)]
    for label, L in tqdm(jobs, desc="model speed", disable=not progress):
        impl, fields = policies.get(label, (label, None))
        model.set_attn_implementation(impl)
        row = {}
        with hf_ahfa.override(**fields) if fields else contextlib.nullcontext():
            _measure_one(model, inputs[L], row, device, decode_tokens, train, last_logits)
        runs[label, L].append(row)
    rows = []
    for (label, L), done in runs.items():
        impl = policies.get(label, (label, None))[0]
        row = {"impl": label, "seq_len": L, **predict(model.config, L, model.dtype.itemsize, impl)}
        for key in ("prefill_s", "decode_tokens_per_s", "train_step_s"):
            values = [r[key] for r in done if key in r]
            if values:
                row[key] = statistics.median(values)  # of two rounds their mean: the same rule for times and rates
                if rounds > 1:
                    row[f"{key}_runs"] = values
        for key in ("prefill_peak_bytes", "train_peak_bytes"):
            if any(key in r for r in done):
                values = [r[key] for r in done if r[key] is not None]  # None off CUDA
                row[key] = max(values) if values else None
        errors = [r["error"] for r in done if "error" in r]
        if errors:
            row["error"] = errors[0]
        rows.append(row)
    return rows


def paired_prefill(model, impls, seq_lens, pairs: int = 25, last_logits=False, vocab=None, progress=True,
                   policies=None, tokens=None, ones_mask=False) -> dict[tuple[str, int], dict]:
    """Each implementation's prefill against the last one's (the baseline), timed as single calls taking turns.

    A host-bound model's prefill time drifts between rounds by more than the differences in question (on the H100
    machine's host, 24-46 ms for the same prefill of a Gemma-3-shaped model, `kernels/NOTES.md`); calls that take
    turns (A B, B A, ...) meet the same drift, and the paired bootstrap interval (``report.paired_change``) says
    what the difference is worth. ``impls``, ``policies``, ``tokens``, ``last_logits``: as ``measure``'s, the
    baseline last. ``ones_mask``: each prefill gets an all-ones ``attention_mask``, as ``generate()`` passes one.
    Returns, for each other label and length, ``speedup`` (the baseline's mean time over its own), ``low`` /
    ``high`` (the 95% interval of ``speedup``), ``pairs`` and the medians ``median_s`` / ``base_median_s``.
    """
    device = next(model.parameters()).device
    keep = {"logits_to_keep": 1} if last_logits else {}

    def prefill(ids):
        mask = {"attention_mask": torch.ones_like(ids)} if ones_mask else {}
        return _seconds(lambda: model(ids, use_cache=True, **keep, **mask).logits[:, -1].argmax(-1), device)

    return _paired(model, impls, seq_lens, pairs, prefill, vocab, progress, policies, tokens, "paired prefill")


def paired_decode(model, impls, seq_lens, pairs: int = 25, decode_tokens: int = 16, vocab=None, progress=True,
                  policies=None, tokens=None) -> dict[tuple[str, int], dict]:
    """``paired_prefill`` for decoding: each sample is ``decode_tokens`` greedy steps on the cache of an untimed
    prefill of ``L`` tokens (``decode_once``); ``speedup`` is then the ratio of tokens per second."""
    if decode_tokens < 1:
        raise ValueError(f"decode_tokens must be at least 1, got {decode_tokens}")
    device = next(model.parameters()).device
    return _paired(model, impls, seq_lens, pairs, lambda ids: decode_once(model, ids, decode_tokens, device),
                   vocab, progress, policies, tokens, "paired decode")


def _paired(model, impls, seq_lens, pairs, run, vocab, progress, policies, tokens, desc):
    """``paired_prefill``'s turns and statistics for any timed ``run(ids) -> seconds``."""
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")
    device = next(model.parameters()).device
    policies = policies or {}
    base = impls[-1]

    def once(label, ids):
        impl, fields = policies.get(label, (label, None))
        model.set_attn_implementation(impl)
        with hf_ahfa.override(**fields) if fields else contextlib.nullcontext():
            if device.type == "cuda":
                torch.cuda.synchronize()  # nothing of the previous call left on the device
            return run(ids)

    results = {}
    for L, ids in tqdm(_inputs(model, seq_lens, vocab, tokens).items(), desc=desc, disable=not progress):
        times = {label: [] for label in impls}
        with torch.no_grad():
            for label in impls:  # warm-up: compiles and the router's timed choices
                once(label, ids)
            for i in range(pairs):
                for label in _turn(impls, i):
                    times[label].append(once(label, ids))
        for label in impls[:-1]:
            change = paired_change(times[label], times[base])
            results[label, L] = dict(speedup=1 / (1 + change["change"]), low=1 / (1 + change["high"]),
                                    high=1 / (1 + change["low"]), pairs=pairs,
                                    median_s=statistics.median(times[label]),
                                    base_median_s=statistics.median(times[base]))
    return results


def _turn(impls: list[str], i: int) -> list[str]:
    """The order of round or pair ``i``: ``impls`` rotated by ``i`` (A B, B A, ...; A B C, B C A, C A B, ...), so
    that each takes each place equally often. (Forward and reversed turns kept a third label always in the middle:
    on the CPU machine an A/A pairing there measured 0.968x, `eval/results/model-decode-qwen2-0.5b-packed-cpu.md`.)"""
    k = i % len(impls)
    return impls[k:] + impls[:k]


def attach_paired(rows: list[dict], pairs: dict[tuple[str, int], dict], metric: str = "prefill") -> None:
    """Put ``paired_prefill``'s (``metric="prefill"``) or ``paired_decode``'s (``"decode"``) results on the rows of
    ``measure`` they belong to (``<metric>_paired``, a column of the report)."""
    for row in rows:
        if (row["impl"], row["seq_len"]) in pairs and "train_step_s" not in row:
            row[f"{metric}_paired"] = pairs[row["impl"], row["seq_len"]]


def _seconds(fn, device) -> float:
    """Seconds of one call of ``fn()``, the device's work included."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _inputs(model, seq_lens, vocab=None, tokens=None) -> dict[int, torch.Tensor]:
    """Per length ``L`` the ``(1, L)`` prompt: the first ``L`` of ``tokens``, else random ids below ``vocab`` (the
    model's vocabulary size by default)."""
    device = next(model.parameters()).device
    vocab = vocab or model.config.get_text_config().vocab_size
    return {L: (torch.tensor(tokens[:L], device=device)[None] if tokens is not None
                else torch.randint(0, vocab, (1, L), device=device)) for L in seq_lens}


def _measure_one(model, ids, row, device, decode_tokens, train, last_logits=False) -> None:
    """Fill ``row`` with prefill, decode and (``train``) training-step measurements of one input."""
    keep = {"logits_to_keep": 1} if last_logits else {}
    try:
        with torch.no_grad():
            row["prefill_s"], row["prefill_peak_bytes"] = _timed(
                lambda: model(ids, use_cache=True, **keep).logits[:, -1].argmax(-1), device)
            if decode_tokens:
                row["decode_tokens_per_s"] = decode_tokens / _decode_seconds(model, ids, decode_tokens, device)
        if train:
            def step():
                model.zero_grad(set_to_none=True)
                model(ids, labels=ids).loss.backward()

            row["train_step_s"], row["train_peak_bytes"] = _timed(step, device)
            model.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0][:160]}"
        torch.cuda.empty_cache()


def _decode_seconds(model, ids, n: int, device, repeat: int = 3) -> float:
    """Median seconds of ``n`` greedy one-token steps on the cache of a prefill of ``ids``, after one warm-up;
    the prefills are not timed (a generate() time minus a separately timed prefill is mostly the prefill's noise
    on a CPU)."""
    times = [decode_once(model, ids, n, device) for _ in range(repeat + 1)]
    return sorted(times[1:])[repeat // 2]


def decode_once(model, ids, n: int, device, around=None) -> float:
    """Seconds of ``n`` greedy one-token steps on the cache of an untimed prefill of ``ids``; the steps alone run
    inside the context manager ``around`` where given (a profiler)."""
    # Transformers 5.25 renamed the forward's past_key_values to cache (the old name warns, to go in 5.40)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(ids, use_cache=True)
    cache, token = out[name], out.logits[:, -1:].argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    with around or contextlib.nullcontext():
        start = time.perf_counter()
        for _ in range(n):
            out = model(token, use_cache=True, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def _paired_text(result: dict | None) -> str | None:
    if not result:
        return None
    return f"{result['speedup']:.3f} ({result['low']:.3f}-{result['high']:.3f}, {result['pairs']} pairs)"


def _gib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**30


def write_model_speed_report(rows: list[dict], config: dict, out_dir, name: str, meta: dict | None = None) -> dict:
    """JSON rows, a Markdown table with ahfa / baseline ratios (each row against the baseline's row of the same
    length and mode: prefill-and-decode or training), and a PNG of prefill time and memory. ``meta``: the
    provenance of a committed run being re-rendered (default: this machine now)."""
    meta = meta or provenance()
    paths = {ext: Path(out_dir) / f"{name}.{ext}" for ext in ("json", "md", "png")}
    write_json(paths["json"], meta, rows, config=config)
    base = list(dict.fromkeys(r["impl"] for r in rows))[-1]
    # paired_prefill's and paired_decode's results, attached by the caller
    paired = [m for m in ("prefill", "decode") if any(f"{m}_paired" in r for r in rows)]
    by = {(r["impl"], r["seq_len"], "train_step_s" in r): r for r in rows}
    lines = []
    for r in rows:
        b = by.get((base, r["seq_len"], "train_step_s" in r), {})

        def speedup(k, rate=False):  # > 1: faster than the baseline
            if r["impl"] == base or not (r.get(k) and b.get(k)):
                return None
            return r[k] / b[k] if rate else b[k] / r[k]

        peak = or_na(_gib(r.get("prefill_peak_bytes"))) if "prefill_s" in r else None  # "n/a": not tracked (CPU)
        lines.append([r["impl"], r["seq_len"], r.get("prefill_s"), peak, r.get("decode_tokens_per_s"),
                      r.get("train_step_s"), r["attn_flops"] / 1e12, r["attn_extra_memory"] / 2**30,
                      speedup("prefill_s"), speedup("decode_tokens_per_s", rate=True), speedup("train_step_s"),
                      r.get("error")] + [_paired_text(r.get(f"{m}_paired")) for m in paired])
    md = [f"# Whole-model speed and memory: {config['model']} on {meta['gpu'] or meta['cpu']}", "",
          f"torch {meta['torch']}, transformers {meta['transformers']}, commit {meta['commit'][:12]}, {meta['date']}, "
          f"dtype {config['dtype']}, batch 1. Predicted columns come from the complexity analyzer "
          f"(`hf_ahfa.eval.model_speed.predict`). Rows with a train step ran in training mode (their prefill too).", "",
          markdown_table(["impl", "tokens", "prefill s", "prefill peak GiB", "decode tok/s", "train step s",
                          "pred. attn TFLOP", "pred. extra GiB", f"prefill vs {base}", f"decode vs {base}",
                          f"train step vs {base}", "error"]
                         + [f"{m} vs {base}, calls taking turns (95% interval)" for m in paired], lines)]
    # a script's notes on the run (model_prefill_speed.py: decisions it moved, an A/A pairing of the baseline, the
    # floor of a bare SDPA call, packing off, an all-ones mask on the paired prefills)
    md += [f"\n{key}: {json.dumps(config[key])}" for key in ("prefer", "a/a", "floor", "packed decode", "ones mask")
           if key in config]
    write_atomic(paths["md"], "\n".join(md) + "\n")
    _plot(rows, config["model"], paths["png"])
    return paths


def _plot(rows: list[dict], model: str, path: Path) -> None:
    """Prefill time, and peak memory where it was measured (CUDA), against prompt length per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = sorted((r for r in rows if r["impl"] == impl and r.get("prefill_s")), key=lambda r: r["seq_len"])
        if mine:
            axes[0].plot([r["seq_len"] for r in mine], [r["prefill_s"] for r in mine], marker="o", label=impl)
        memory = [(r["seq_len"], _gib(r["prefill_peak_bytes"])) for r in mine if r.get("prefill_peak_bytes") is not None]
        if memory:
            axes[1].plot(*zip(*memory), marker="o", label=impl)
    for ax, label in zip(axes, ("prefill time (s)", "prefill peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend(fontsize=8)
    if not axes[1].lines:
        axes[1].text(0.5, 0.5, "n/a: peak memory is tracked on CUDA only", ha="center", transform=axes[1].transAxes)
    fig.suptitle(f"{model}: whole-model prefill", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
