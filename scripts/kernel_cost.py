"""What a kernel change costs, per feature: our own Triton kernels (``backend="triton"``, never routed) timed on
the cases a change touches, in whichever hf_ahfa tree is on PYTHONPATH; run it once per tree and round, then
``--report`` compares the trees (median of the rounds, ratio to the first tree named).

Cases: causal (masked diagonal tiles), a 1024-token window (masked tiles at both edges), key padding (a
quarter of each row's keys padded: masked tail tiles), softcap 50 (tanh on every score), full attention (no
masked tile but the last), and decode (4 queries over a long cache: the split-KV kernel). bf16, 32 heads (GQA 32/8), head dim 128, 32K tokens per batch.

    python scripts/kernel_cost.py --label after --jsonl OUT/cost.jsonl      # once per tree and round
    python scripts/kernel_cost.py --report OUT/cost.jsonl --trees before,after --out-dir OUT --name cost
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def cases(seq_len: int):
    pad = torch.arange(seq_len, device="cuda")[None] < seq_len * 3 // 4
    return {
        "causal": dict(causal=True),
        "window-1024": dict(causal=True, window=1024),
        "key-padding": dict(key_padding_mask=pad),
        "softcap-50": dict(causal=True, softcap=50.0),
        "full": dict(causal=False),
    }


def time_tree(label: str, jsonl: str, seq_len: int, decode_len: int) -> None:
    from triton.testing import do_bench

    import hf_ahfa

    torch.manual_seed(0)
    B, H, Hkv, D = 32768 // seq_len, 32, 8, 128
    q = torch.randn(B, seq_len, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, seq_len, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    rows = []
    for case, kw in cases(seq_len).items():
        if "key_padding_mask" in kw:
            kw = dict(kw, key_padding_mask=kw["key_padding_mask"].expand(B, -1))
        fwd = lambda: hf_ahfa.attention(q, k, v, backend="triton", **kw)  # noqa: E731
        out = fwd()
        grad = torch.randn_like(out)
        both = lambda: torch.autograd.grad(fwd(), (q, k, v), grad)  # noqa: E731
        for mode, fn in (("fwd", fwd), ("fwd+bwd", both)):
            rows.append(dict(tree=label, case=case, mode=mode, seq_len=seq_len, ms=do_bench(fn, warmup=25, rep=200)))
    qd = torch.randn(1, 4, H, D, device="cuda", dtype=torch.bfloat16)
    kd, vd = (torch.randn(1, decode_len, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    for case, kw in (("decode", dict(causal=True)), ("decode-softcap-50", dict(causal=True, softcap=50.0))):
        ms = do_bench(lambda: hf_ahfa.attention(qd, kd, vd, backend="triton", **kw), warmup=25, rep=200)
        rows.append(dict(tree=label, case=case, mode="fwd", seq_len=decode_len, ms=ms))
    with open(jsonl, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            print(f"{label:>10} {row['case']:>18} {row['mode']:>8} {row['seq_len']:>7} {row['ms']:8.3f} ms")


def report(jsonl: str, trees: list[str], out_dir: str, name: str) -> None:
    import triton

    rows = [json.loads(line) for line in open(jsonl)]
    keys = sorted({(r["case"], r["mode"], r["seq_len"]) for r in rows}, key=lambda x: (x[0], x[1]))
    table = []
    for key in keys:
        times = {t: sorted(r["ms"] for r in rows if r["tree"] == t and (r["case"], r["mode"], r["seq_len"]) == key)
                 for t in trees}
        if not all(times.values()):
            continue
        med = {t: statistics.median(ts) for t, ts in times.items()}
        table.append(dict(case=key[0], mode=key[1], seq_len=key[2], ms=times, median_ms=med,
                          ratio={t: med[t] / med[trees[0]] for t in trees[1:]}))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, trees=trees,
                note="own Triton kernels (backend='triton'), bf16, H=32/8, D=128, 32K tokens per batch; "
                     "triton.testing.do_bench median per run; ratio = median over runs / first tree's")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(dict(meta=meta, rows=table), indent=1))
    lines = [f"# Kernel cost per feature ({gpu})", "", meta["note"], "",
             "| case | mode | tokens | " + " | ".join(f"{t} ms (runs)" for t in trees)
             + " | " + " | ".join(f"{t} / {trees[0]}" for t in trees[1:]) + " |",
             "|---" * (3 + 2 * len(trees) - 1) + "|"]
    for r in table:
        cells = [", ".join(f"{x:.3f}" for x in r["ms"][t]) for t in trees]
        lines.append(f"| {r['case']} | {r['mode']} | {r['seq_len']} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{r['ratio'][t]:.3f}" for t in trees[1:]) + " |")
    # a feature's own cost inside each tree: the case against its plain counterpart (softcap vs causal)
    lines += ["", "Within each tree, median time of the case over its plain counterpart:", "",
              "| case | mode | " + " | ".join(trees) + " |", "|---" * (2 + len(trees)) + "|"]
    med = {(r["case"], r["mode"]): r["median_ms"] for r in table}
    for case, plain in (("softcap-50", "causal"), ("decode-softcap-50", "decode"), ("window-1024", "causal")):
        for mode in ("fwd", "fwd+bwd"):
            if (case, mode) in med and (plain, mode) in med:
                lines.append(f"| {case} / {plain} | {mode} | "
                             + " | ".join(f"{med[case, mode][t] / med[plain, mode][t]:.3f}" for t in trees) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", help="name of the tree on PYTHONPATH (timing run)")
    parser.add_argument("--jsonl", help="timing run: file the rows are appended to")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--decode-len", type=int, default=32768)
    parser.add_argument("--report", metavar="JSONL", help="compare the trees of a JSONL file instead of timing")
    parser.add_argument("--trees", help="report: tree labels, comma-separated, the first is the baseline")
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--name", default="kernel-cost")
    args = parser.parse_args()
    if args.report:
        if not args.trees:
            parser.error("--report needs --trees (labels, comma-separated, the baseline first)")
        report(args.report, args.trees.split(","), args.out_dir, args.name)
    elif args.label and args.jsonl:
        time_tree(args.label, args.jsonl, args.seq_len, args.decode_len)
    else:
        parser.error("give --label and --jsonl (timing) or --report with --trees")
