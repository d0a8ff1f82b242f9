"""Where the time of a block-sparse call goes (GPU): wall time of a call against exact attention, the
estimator and the selection alone (CUDA events around each, eager), and torch.profiler's top device
operators of the estimate + select step. Default shapes: one layer of the Qwen2.5-0.5B layout. ``--kept`` adds the
block-sparse kernels alone on layouts keeping about that share of the causal blocks (``ahfa-eval speed``'s
``ahfa-sparse-D`` layouts: random per head, the sink and diagonal blocks always): what the sparse part of an
adaptive call costs at a kept share, which random inputs (flat attention: nearly every block kept) cannot show.

    python scripts/profile_adaptive.py --seq-lens 8192,32768 --heads 14,2,64 --kept 0.25,0.5
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import hf_ahfa
from hf_ahfa import estimate
from hf_ahfa.adaptive import _select
from hf_ahfa.eval.speed import random_layout, visible_blocks
from hf_ahfa.spec import make_call


def estimator(q, k, call, policy):
    """The estimator's kernel alone (on trees before the selection kernels: with its softmax epilogue)."""
    if hasattr(estimate, "estimate_row_tiles"):
        return estimate.estimate_row_tiles(q, k, call, policy)
    return estimate.estimate_row_mass(q, k, call, policy, kernels=True)


def timed(fn, reps):
    """Median milliseconds of ``fn`` over ``reps`` calls (after 3 warm-up calls), CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="8192,32768")
    ap.add_argument("--heads", default="14,2,64", help="query heads, key/value heads, head dim")
    ap.add_argument("--strides", default="16", help="estimator strides to time (policy.stride), e.g. 16,8")
    ap.add_argument("--kept", default="", help="kept shares to time the block-sparse kernels alone at, e.g. 0.25,0.5")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="print the profiler's table of estimate + select")
    ap.add_argument("--out-dir", help="write <name>.json and <name>.md there")
    ap.add_argument("--name", default="profile-adaptive")
    ap.add_argument("--label", default="", help="a label for the tree measured (a column of the report)")
    args = ap.parse_args()
    H, HKV, D = (int(x) for x in args.heads.split(","))
    strides = [int(x) for x in args.strides.split(",")]
    rows = []
    for T in (int(x) for x in args.seq_lens.split(",")):
        torch.manual_seed(0)
        q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) * 2
        k, v = (torch.randn(1, T, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        call = make_call(q, k, v, causal=True)
        steps = {"exact (routed)": lambda: hf_ahfa.attention(q, k, v, causal=True)}
        for stride in strides:
            p = hf_ahfa.AdaptivePolicy(mode="adaptive", stride=stride)
            tag = "" if len(strides) == 1 else f" stride {stride}"
            steps.update({
                f"adaptive (graph){tag}": lambda p=p: hf_ahfa.attention(q, k, v, causal=True, policy=p),
                f"estimator{tag}": lambda p=p: estimator(q, k, call, p),
                f"estimator + selection{tag}": lambda p=p: _select(q, k, call, p, backward=False),
                f"estimator + selection (backward lists){tag}": lambda p=p: _select(q, k, call, p, backward=True),
            })
        policy = hf_ahfa.AdaptivePolicy(mode="adaptive", stride=strides[0])
        for share in (float(x) for x in args.kept.split(",") if x):
            lay = random_layout(1, H, T, share, True, "cuda", block=policy.block_size)
            kept = lay.density(visible_blocks(T, True, "cuda", policy.block_size))
            steps[f"block-sparse kernel, {kept:.0%} of blocks kept"] = (
                lambda lay=lay: hf_ahfa.attention(q, k, v, causal=True, layout=lay))
        ms = {name: timed(fn, args.reps) for name, fn in steps.items()}
        print(f"T={T} H={H}/{HKV} D={D}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in ms.items()), flush=True)
        exact = ms["exact (routed)"]
        rows += [dict(label=args.label, seq_len=T, step=n, ms=t, of_exact=t / exact) for n, t in ms.items()]
        if args.profile:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    _select(q, k, call, policy, backward=False)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    if args.out_dir:
        write(args, rows, (H, HKV, D))


def write(args, rows, heads):
    """``<name>.json`` (the rows, the GPU, the versions) and ``<name>.md`` (one table) under ``--out-dir``."""
    import json
    import pathlib

    import triton

    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                heads=heads, reps=args.reps, dtype="bfloat16", causal=True)
    (out / f"{args.name}.json").write_text(json.dumps(dict(meta, rows=rows), indent=1))
    lines = [f"# Adaptive call, where the time goes: {meta['gpu']}, heads {heads[0]}/{heads[1]}, D={heads[2]}, bf16, "
             f"causal, batch 1 (median of {args.reps} CUDA-event timings per step)", "",
             "| tree | tokens | step | ms | of exact (routed) |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['seq_len']} | {r['step']} | {r['ms']:.3f} | {r['of_exact']:.3f} |" for r in rows]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
