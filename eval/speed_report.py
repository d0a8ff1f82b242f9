"""Speed results: JSON rows, a Markdown table with ratios against each baseline, a TFLOP/s plot."""

from __future__ import annotations

from pathlib import Path

from hf_ahfa.eval.report import markdown_table, provenance, write_atomic, write_json
from hf_ahfa.eval.speed import ratios

BASELINES = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex", "flash-attn")


def write_speed_report(rows: list[dict], out_dir: Path, name: str) -> dict[str, Path]:
    meta = provenance()
    paths = {ext: Path(out_dir) / f"{name}.{ext}" for ext in ("json", "md", "png")}
    speedups = {b: {"/".join(map(str, k)): v for k, v in ratios(rows, b).items()} for b in BASELINES}
    from hf_ahfa.kernels.tuning import chosen

    write_json(paths["json"], meta, rows, ahfa_speedup=speedups, ahfa_launch_configs=chosen())

    prefill = [r for r in rows if r["kind"] == "prefill"]
    providers = list(dict.fromkeys(r["provider"] for r in prefill))
    shapes = list(dict.fromkeys((r["head_dim"], r["mode"], r["causal"], r["q_len"], r["batch"]) for r in prefill))
    cell = {(r["provider"], r["head_dim"], r["mode"], r["causal"], r["q_len"]): r for r in prefill}
    lines = []
    for D, mode, causal, T, B in shapes:
        line = [D, mode, "causal" if causal else "full", T, B]
        for p in providers:
            r = cell.get((p, D, mode, causal, T))
            line.append(None if r is None or r["ms"] is None else
                        f"{r['ms']:.3f} ms" + (f" ({r['tflops']:.0f})" if r["tflops"] else ""))
        base = cell.get(("sdpa-cudnn", D, mode, causal, T))
        ours = cell.get(("ahfa", D, mode, causal, T))
        line.append(f"{base['ms'] / ours['ms']:.2f}x" if base and ours and base["ms"] and ours["ms"] else None)
        lines.append(line)
    md = [f"# Attention kernel speed: {meta['gpu']}", "",
          f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit'][:12]}, {meta['date']}."]
    if prefill:
        md += ["", "bf16, H=32, 32K tokens per batch; median time (TFLOP/s). Last column: ahfa speed / cuDNN speed.", "",
               markdown_table(["D", "mode", "mask", "T", "B", *providers, "ahfa vs cuDNN"], lines)]
    decode = [r for r in rows if r["kind"] == "decode"]
    if decode:
        sdpa = {r["k_len"]: r["ms"] for r in decode if r["provider"] == "sdpa" and r["ms"]}
        md += ["", "## Decode (q_len 1, batch 8, GQA 32/8, D 128): median time (TB/s of K/V read)", "",
               markdown_table(["KV len", "provider", "ms", "TB/s", "speed vs sdpa"],
                              [[r["k_len"], r["provider"], r["ms"], r["tbps"],
                                f"{sdpa[r['k_len']] / r['ms']:.2f}x" if r["k_len"] in sdpa else None]
                               for r in decode if r["ms"]])]
    errors = [r for r in rows if r["error"]]
    if errors:
        md += ["", "## Not measured", ""] + [f"- {r['provider']} {r['mode']} T={r['q_len']} D={r['head_dim']}: "
                                             f"{r['error']}" for r in errors]
    write_atomic(paths["md"], "\n".join(md) + "\n")
    if not prefill:  # a decode-only sweep (--seq-lens ""): its table is the result
        return {ext: path for ext, path in paths.items() if ext != "png"}
    _plot(prefill, paths["png"], meta["gpu"])
    return paths


def _plot(prefill: list[dict], path: Path, gpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["head_dim"] for r in prefill})
    panels = sorted({(r["mode"], r["causal"]) for r in prefill})
    fig, axes = plt.subplots(len(dims), len(panels), figsize=(3.6 * len(panels), 3.2 * len(dims)), squeeze=False)
    for ax, (D, (mode, causal)) in zip(axes.flat, [(d, p) for d in dims for p in panels]):
        for p in dict.fromkeys(r["provider"] for r in prefill):
            pts = sorted((r["q_len"], r["tflops"]) for r in prefill
                         if (r["provider"], r["head_dim"], r["mode"], r["causal"]) == (p, D, mode, causal) and r["tflops"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p, linewidth=2.5 if p == "ahfa" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(f"D={D} {mode} {'causal' if causal else 'full'}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"attention TFLOP/s, bf16, {gpu}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
