"""Attention time of a real model's prefill: ahfa exact and adaptive against SDPA's kernels, same calls.

One forward of the model over real text records every attention call (query, key, value and the
arguments Transformers passes, e.g. scaling and sliding window). Each provider then replays all calls of
the forward in order, timed as one unit (CUDA events, median of ``repeat`` runs after a warm-up run that
also autotunes): the whole attention of a prefill. Adaptive variants include the estimator and the block
selection in their time. SDPA providers get a sliding-window layer's window as a boolean mask; cuDNN and
FA2 take no such mask, so their totals count sliding layers at PyTorch's own choice of backend (``sdpa``),
and the report also gives the time of the full-attention layers alone, where every provider applies.
ahfa's rows run our own kernels (``backend="triton"``); ``ahfa-routed`` runs exact attention as a model gets it,
each call routed (to SDPA where that was timed faster, ``hf_ahfa.router``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

import hf_ahfa
from hf_ahfa.eval.report import markdown_table, or_na, provenance, write_atomic, write_json

CAPTURE = "ahfa_capture"
SDPA = {"sdpa": None, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION}


def capture_calls(model, ids: torch.Tensor) -> list[dict]:
    """The attention calls of one forward of ``model`` over ``ids``: tensors in ahfa's ``(B, T, H, D)``
    layout and the arguments that change the function (causal, window, softcap, sinks, scale).

    The forward runs through ahfa's registered attention and mask functions (taken from Transformers'
    registries), under a name of its own whose attention function records each call first.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ahfa_attention, ahfa_mask = ALL_ATTENTION_FUNCTIONS[hf_ahfa.NAME], ALL_MASK_ATTENTION_FUNCTIONS[hf_ahfa.NAME]
    calls = []

    def record(module, query, key, value, attention_mask, scaling=None, sliding_window=None, softcap=None,
               s_aux=None, is_causal=None, **kw):
        if attention_mask is not None:
            raise ValueError("attention replay needs a plain prefill (no padding): the layer got a dense mask")
        calls.append(dict(
            layer=getattr(module, "layer_idx", len(calls)), q=query.transpose(1, 2), k=key.transpose(1, 2),
            v=value.transpose(1, 2), causal=getattr(module, "is_causal", True) if is_causal is None else is_causal,
            window=sliding_window if sliding_window is not None else getattr(module, "sliding_window", None),
            softcap=softcap, sinks=s_aux, scale=scaling,
        ))
        return ahfa_attention(module, query, key, value, attention_mask, scaling=scaling,
                              sliding_window=sliding_window, softcap=softcap, s_aux=s_aux, is_causal=is_causal, **kw)

    AttentionInterface.register(CAPTURE, record)
    AttentionMaskInterface.register(CAPTURE, ahfa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
    return calls


def _ahfa(call, policy, backend="triton"):
    return lambda: hf_ahfa.attention(call["q"], call["k"], call["v"], causal=call["causal"], window=call["window"],
                                     softcap=call["softcap"], sinks=call["sinks"], scale=call["scale"],
                                     backend=backend, policy=policy)


def _sdpa(call, backend, masks: dict):
    """SDPA on one call; ``backend`` None = PyTorch's choice. Windows become a boolean mask."""
    if call["softcap"] or call["sinks"] is not None:
        raise ValueError("SDPA has no softcap or sinks")
    q, k, v = (t.transpose(1, 2) for t in (call["q"], call["k"], call["v"]))
    T, W = q.shape[2], call["window"]
    mask = None
    if W is not None and W < T:
        if (T, W) not in masks:
            i = torch.arange(T, device=q.device)
            masks[T, W] = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)
        mask, backend = masks[T, W], None  # cuDNN / FA2 take no window: PyTorch's choice of backend
    causal = call["causal"] and mask is None
    gqa = q.shape[1] != k.shape[1]

    def run():
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=call["scale"],
                                                  enable_gqa=gqa)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=call["scale"], enable_gqa=gqa)

    return run


def _time(fns, repeat: int) -> float:
    """Median milliseconds of running ``fns`` in order, after one untimed run (CUDA events on a GPU)."""
    for f in fns:
        f()
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        for f in fns:
            f()
        if cuda:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[repeat // 2]


def measure(calls: list[dict], variants: dict[str, hf_ahfa.AdaptivePolicy | None], providers: list[str],
            repeat: int = 5) -> list[dict]:
    """One row per provider: total milliseconds over all calls, over the full-attention calls (no window)
    and, for adaptive variants, the kept share of visible blocks (mean, and per layer)."""
    rows = []
    masks: dict = {}
    full = [c for c in calls if c["window"] is None or c["window"] >= c["q"].shape[1]]
    T = calls[0]["q"].shape[1]
    jobs = [(name, lambda c, p=policy: _ahfa(c, p)) for name, policy in variants.items()]
    if "ahfa" in variants and variants["ahfa"] is None:
        jobs.append(("ahfa-routed", lambda c: _ahfa(c, None, backend=None)))
    jobs += [(name, lambda c, b=SDPA[name]: _sdpa(c, b, masks)) for name in providers]
    with torch.no_grad():
        for name, make in tqdm(jobs, desc=f"attention replay {T}", leave=False):
            row = {"seq_len": T, "provider": name, "layers": len(calls), "full_layers": len(full)}
            try:
                row["ms"] = _time([make(c) for c in calls], repeat)
                row["full_ms"] = _time([make(c) for c in full], repeat) if full else None
            except Exception as err:  # noqa: BLE001 - a provider that cannot run these calls is reported
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            policy = variants.get(name)
            if policy is not None and "error" not in row:
                row.update(_kept_blocks(calls, policy))
            rows.append(row)
    return rows


def _kept_blocks(calls: list[dict], policy: hf_ahfa.AdaptivePolicy) -> dict:
    """One untimed replay under ``hf_ahfa.record()``: the kept share of visible blocks (mean and per layer)
    and the heads that fell back to all blocks, over the calls that ran block-sparse."""
    sparse = []  # (layer, record entry); each call is recorded alone, so its entries belong to its layer
    for c in calls:
        with hf_ahfa.record() as rec:
            _ahfa(c, policy)()
        sparse += [(c["layer"], r) for r in rec if r.get("density") is not None]
    return {"density": sum(r["density"] for _, r in sparse) / len(sparse) if sparse else None,
            "layer_density": {str(layer): r["density"] for layer, r in sparse},
            "dense_heads": sum(r["dense_heads"] for _, r in sparse)}


def report_lines(rows: list[dict]) -> list[str]:
    """Markdown: per length, each provider's total and full-layer time and its speed-up over the others."""
    lines = []
    for T in sorted({r["seq_len"] for r in rows}):
        mine = {r["provider"]: r for r in rows if r["seq_len"] == T}
        ref = {p: mine[p] for p in ("sdpa-cudnn", "sdpa-flash", "ahfa") if mine.get(p, {}).get("ms")}

        def ratio(r, base, key):
            return f"{base[key] / r[key]:.2f}x" if r.get(key) and base.get(key) else None

        table = [[p, r.get("ms"), r.get("full_ms"), or_na(r.get("density")),
                  *[ratio(r, ref[b], k) if b in ref else None for b in ref for k in ("ms", "full_ms")], r.get("error")]
                 for p, r in mine.items()]
        heads = [f"{k} vs {b}" for b in ref for k in ("total", "full layers")]
        lines += [f"### {T} tokens ({next(iter(mine.values()))['layers']} attention layers, "
                  f"{next(iter(mine.values()))['full_layers']} without a window)", "",
                  markdown_table(["provider", "total ms", "full-attention layers ms", "kept blocks", *heads, "error"],
                                 table), ""]
    return lines


def write_attention_report(rows: list[dict], config: dict, out_dir, name: str, max_pos: int | None) -> dict[str, Path]:
    """``<name>.json`` (rows, config, provenance) and ``<name>.md`` (``report_lines`` and notes)."""
    meta = provenance()
    paths = {ext: Path(out_dir) / f"{name}.{ext}" for ext in ("json", "md")}
    write_json(paths["json"], meta, rows, config=config)
    longest = max(r["seq_len"] for r in rows)
    notes = [f"lengths above the model's max_position_embeddings ({max_pos}) run beyond its trained positions"] \
        if max_pos and longest > max_pos else []
    md = [f"# Attention time of a prefill: {config['model']} on {meta['gpu'] or meta['cpu']}", "",
          f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit'][:12]}, {meta['date']}, "
          f"{config['dtype']}, batch 1, text {config['text']}. Every attention call of one forward, replayed per "
          "provider (median of 5 after a warm-up). Adaptive rows include the estimator and block selection; kept "
          "blocks = share of visible 128x128 blocks computed in the layers that ran block-sparse.", "",
          *report_lines(rows), *[f"- {n}" for n in notes]]
    write_atomic(paths["md"], "\n".join(md) + "\n")
    return paths
