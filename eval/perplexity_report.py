"""What a perplexity run writes: ``<name>.json`` (rows, summary, notes), ``<name>.md`` and, for the long
protocol, a plot of perplexity against context length (and, in adaptive/auto mode, one against tau)."""

from __future__ import annotations

import os
from pathlib import Path

from hf_ahfa.eval.perplexity_metrics import BOOTSTRAP_BLOCK
from hf_ahfa.eval.report import markdown_table, or_na, provenance, write_atomic, write_json


def write_report(args, config: dict, rows: list[dict], summary: dict, notes: list[str],
                 paths: dict[str, Path]) -> dict[str, Path]:
    """Write the JSON, Markdown (and plots) of a finished run into ``paths`` (adding the plots'); print the
    Markdown."""
    meta = provenance()
    write_json(paths["json"], meta, rows, config=config, summary=summary, notes=notes)
    labels = [v["label"] for v in config["attention"]["variants"]]
    tests = [label for label in labels if label != summary["baseline"]]
    head = [f"# Perplexity ({args.protocol} protocol): {', '.join(tests)} vs {summary['baseline']}", "",
            f"Model `{args.model}`, {config['dtype']} on {config['device']}; data: {config['data']}. "
            f"torch {meta['torch']}, transformers {meta['transformers']}, commit {meta['commit'][:12]}, "
            f"{meta['date']}" + (f", {meta['gpu']}" if meta["gpu"] else "") + ".", ""]
    if args.protocol == "wikitext":
        md = wikitext_markdown(summary, config, tests, args.threshold)
    else:
        md = long_markdown(rows, summary, tests, args.score_tokens, args.threshold)
    tail = ["", "## Notes", ""] + [f"- {n}" for n in notes] if notes else []
    write_atomic(paths["md"], "\n".join(head + md + tail) + "\n")
    if args.protocol == "long":
        paths["png"] = paths["md"].with_suffix(".png")
        _plot_long(summary, paths["png"], args)
        if args.mode != "exact":
            paths["tau_png"] = paths["md"].with_name(f"{paths['md'].stem}-tau.png")
            _plot_tau(summary, paths["tau_png"], args)
    print(paths["md"].read_text())
    return paths


def wikitext_markdown(summary: dict, config: dict, tests: list[str], threshold: float) -> list[str]:
    """Per implementation: tokens, NLL, the three perplexity measures, time, kept blocks; the verdicts."""
    per_impl, base, windows = summary["impls"], summary["baseline"], summary["windows"]
    max_length, stride, ours = config["max_length"], config["stride"], per_impl[tests[0]]
    md = [f"{windows} windows of {max_length} tokens, stride {stride}: {ours['tokens']} of "
          f"{summary['tokens_total']} tokens scored"
          + (" (the first token of each window is context only)" if stride == max_length and windows > 1 else "")
          + f"; {ours['words']} words, {ours['bytes']} UTF-8 bytes.", "",
          markdown_table(["implementation", "tokens scored", "NLL", "token ppl", "word ppl", "bits/byte", "forward s",
                          "kept blocks"],
                         [[impl, m["tokens"], f"{m['nll']:.6f}", f"{m['token_ppl']:.6f}", f"{m['word_ppl']:.6f}",
                           f"{m['bits_per_byte']:.6f}", m["seconds"], or_na(m["density"])]
                          for impl, m in per_impl.items()]), ""]
    md += [f"**{'PASS' if v['pass'] else 'FAIL'}**: {label} token perplexity {v['ahfa']:.6f} vs {base} "
           f"{v['baseline']:.6f}, relative change {v['relative_change']:+.2e} (threshold {threshold:.2%})."
           for label, v in summary["verdicts"].items()]
    md += [f"Word perplexity {summary['relative_change']['word_ppl']:+.2e}, bits/byte "
           f"{summary['relative_change']['bits_per_byte']:+.2e} ({tests[0]})."]
    return md


def _context_table(summary: dict) -> str:
    base = summary["baseline"]
    lines = []
    for x in summary["by_context"]:
        for i in x["ppl"]:
            v = x["verdicts"].get(i)
            ci = v.get("ci95") if v else None
            lines.append([x["ctx"], x["books"], i, f"{x['ppl'][i]:.6f}", f"{v['relative_change']:+.2e}" if v else "",
                          f"[{ci[0]:+.2e}, {ci[1]:+.2e}]" if ci else ("n/a" if v else ""),
                          or_na(x["density"][i]), x["seconds"][i],
                          f"{x['seconds'][base] / x['seconds'][i]:.2f}x" if i != base else "",
                          ("PASS" if v["pass"] else "FAIL") if v else ""])
    return markdown_table(["context", "books", "implementation", "ppl", f"vs {base}", "95% interval", "kept blocks",
                           "forward s", f"speed-up vs {base}", "verdict"], lines)


def _long_verdict_lines(summary: dict, threshold: float) -> list[str]:
    """One line per tested implementation: passes at every context length, or the lengths where it failed."""
    return [f"**PASS** {impl}: within {threshold:.2%} at every context length." if not failed else
            f"**FAIL** {impl} at {', '.join(map(str, failed))} tokens (threshold {threshold:.2%})."
            for impl, failed in summary["failing_contexts"].items()]


def long_markdown(rows: list[dict], summary: dict, tests: list[str], score_tokens: int, threshold: float) -> list[str]:
    """Per context length: perplexity of each implementation, change, kept blocks, time, verdict; per book;
    kept blocks per layer when some calls ran block-sparse."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ppl = {(r["doc"], r["ctx"], r["impl"]): r["ppl"] for r in rows}
    books = dict.fromkeys((r["title"], r["doc"], r["ctx"], r["end"]) for r in rows)
    base = summary["baseline"]
    md = [f"Per book, the same {score_tokens} tokens are scored with each context length: the last ones of a "
          "context that ends at a fixed position of the book (the longest context length, or the book's end); "
          "perplexity over all books per length. 95% interval: paired bootstrap of the perplexity change over "
          f"blocks of {BOOTSTRAP_BLOCK} scored tokens, resampled within each book; a version passes when the "
          "interval's upper end is within the threshold. Kept blocks: share of the visible 128x128 blocks ahfa's "
          "block-sparse calls computed (layers that ran exact not counted); forward s: whole-model forward time "
          "summed over books.", "", _context_table(summary), "",
          *_long_verdict_lines(summary, threshold), "", "## Per book", "",
          markdown_table(["book", "context", "context ends at", *[f"{i} ppl" for i in impls],
                          *[f"{i} vs {base}" for i in tests]],
                         [[title, c, end, *[f"{ppl[d, c, i]:.6f}" for i in impls],
                           *[f"{ppl[d, c, i] / ppl[d, c, base] - 1:+.2e}" if (d, c, i) in ppl else "" for i in tests]]
                          for title, d, c, end in books])]
    layered = [x for x in summary["by_context"] if any(x["layer_density"][t] for t in tests)]
    if layered:
        md += ["", "## Kept blocks per layer (block-sparse calls only)", "",
               markdown_table(["context", "implementation", "per layer (layer: kept share)"],
                              [[x["ctx"], t, ", ".join(f"{k}: {v:.2f}" for k, v in x["layer_density"][t].items())]
                               for x in layered for t in tests])]
    return md


def _save(fig, path: Path) -> None:
    """Save ``fig`` through a temporary file (an interrupted run never leaves half a PNG) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_long(summary: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [x["ctx"] for x in summary["by_context"]]
    for impl in summary["by_context"][0]["ppl"]:
        style = dict(marker="s", linewidth=3, alpha=0.5) if impl == summary["baseline"] else dict(marker="o")
        ax.plot(xs, [x["ppl"][impl] for x in summary["by_context"]], label=impl, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"perplexity of the last {args.score_tokens} tokens")
    books = max(x["books"] for x in summary["by_context"])
    ax.set_title(f"{Path(args.model).name}, {books} book(s)", fontsize=9)
    ax.legend()
    _save(fig, path)


def _plot_tau(summary: dict, path: Path, args) -> None:
    """Quality against speed per context length: one point per tau (relative perplexity change vs
    whole-model forward speed-up over the baseline), with the kept-block share beside each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = summary["baseline"]
    for x in summary["by_context"]:
        pts = [(x["seconds"][base] / x["seconds"][t], 100 * v["relative_change"], t, x["density"][t])
               for t, v in x["verdicts"].items()]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{x['ctx']} tokens")
        for sx, sy, t, d in pts:
            ax.annotate(t.rsplit("tau", 1)[-1] + (f" ({d:.0%})" if d is not None else ""), (sx, sy), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(100 * args.threshold, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel(f"whole-model forward speed-up over {base}")
    ax.set_ylabel("perplexity change (%)")
    ax.set_title(f"{Path(args.model).name}: tau (kept blocks) vs quality and speed", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)
