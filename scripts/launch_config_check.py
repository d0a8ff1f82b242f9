"""Each launch configuration of a flash-kernel table (``--table BWD``: backward, ``FWD``: forward) pinned in
turn, in one process each (a CUDA error ends its process's context), on one or more source trees: does the
fwd+bwd call crash, give non-finite or wrong outputs or gradients (against the float32 reference on the first
batch row)? Finds a launch configuration that fails with one GPU / Triton version, and whether a code change
brought it. The autotuner may pick any entry; the fuzz runs the first only. With ``--time`` each configuration is
also timed against cuDNN SDPA on the same tensors (one process at a time; the forward for ``FWD``, forward and
backward for ``BWD``), to choose a table's order; ``--configs`` checks candidates that are not in the table yet.

    python scripts/launch_config_check.py --trees after=/tmp/after,before=/tmp/before --out-dir OUT \
        [--table BWD] [--head-dims 64,128,256] [--alibi] [--seq-len 4096 --batch 8 --heads 16 --kv-heads 16] [--time]
        [--configs "64,64,4,1;32,128,8,1"]

Each tree is a folder to put on PYTHONPATH (the package laid out as installed).
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--trees", help="name=path,... (the parent run)")
parser.add_argument("--out-dir")
parser.add_argument("--name", default="launch-config-check")
parser.add_argument("--table", default="BWD", choices=["BWD", "FWD"])
parser.add_argument("--head-dims", default="64,128,256")
parser.add_argument("--alibi", action="store_true", help="with ALiBi slopes (Bloom's)")
parser.add_argument("--seq-len", type=int, default=4096)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--kv-heads", type=int, help="key/value heads (GQA; default: --heads)")
parser.add_argument("--causal", default="both", choices=["both", "yes", "no"], help="which masks to run")
parser.add_argument("--configs", help="BLOCK_M,BLOCK_N,warps,stages;... to check instead of the table's entries")
parser.add_argument("--time", action="store_true", help="also time the forward against cuDNN (runs one at a time)")
parser.add_argument("--parallel", type=int, default=8)
parser.add_argument("--one", help="(child) BLOCK_M,BLOCK_N,warps,stages:head_dim:causal")
args = parser.parse_args()
NAMES = ("out", "dq", "dk", "dv")


def child() -> None:
    os.environ["AHFA_AUTOTUNE"] = "0"
    import torch

    import hf_ahfa
    from hf_ahfa.kernels import configs

    cfg_text, D, causal = args.one.split(":")
    D, causal = int(D), causal == "1"
    getattr(configs, args.table)["sm90"][configs.bucket(D)][:] = [tuple(int(x) for x in cfg_text.split(","))]
    torch.manual_seed(0)
    B, T, H, Hkv = args.batch, args.seq_len, args.heads, args.kv_heads or args.heads
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (H, Hkv, Hkv))
    slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda") if args.alibi else None
    out = hf_ahfa.attention(q, k, v, causal=causal, backend="triton", alibi_slopes=slopes)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    torch.cuda.synchronize()
    leaves = [t[:1].detach().float().requires_grad_() for t in (q, k, v)]
    ref = hf_ahfa.attention(*leaves, causal=causal, backend="reference", alibi_slopes=slopes)
    want = torch.autograd.grad(ref, leaves, g[:1].float())
    got, want = (out, *grads), (ref, *want)
    errs = {n: ((a[:1].float() - b).abs().max() / b.abs().max()).item() for n, a, b in zip(NAMES, got, want)}
    finite = all(bool(a.isfinite().all()) for a in got)
    status = "ok" if finite and max(errs.values()) < 0.05 else ("non-finite" if not finite else "wrong")
    row = dict(status=status, errors=errs, gpu=torch.cuda.get_device_name(), triton=__import__("triton").__version__)
    if args.time and status == "ok":
        row.update(_times(q.detach(), k.detach(), v.detach(), causal, slopes, train=args.table == "BWD"))
    print(json.dumps(row))


def _times(q, k, v, causal, slopes, train: bool) -> dict:
    """Milliseconds of the pinned configuration and of cuDNN SDPA (no ALiBi there) on the same tensors: the forward,
    or forward and backward where ``train``; each the better of two do_bench medians taken in alternation."""
    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import hf_ahfa

    leaves = [t.requires_grad_(train) for t in (q, k, v)]
    gout = torch.randn_like(q)

    def ours():
        return hf_ahfa.attention(*leaves, causal=causal, backend="triton", alibi_slopes=slopes)

    def cudnn():
        qt, kt, vt = (t.transpose(1, 2) for t in leaves)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=causal, enable_gqa=kt.shape[1] != qt.shape[1]).transpose(1, 2)

    def timed(fn):
        return (lambda: fn().backward(gout)) if train else fn

    with torch.set_grad_enabled(train):
        ms = [triton.testing.do_bench(timed(f), warmup=50, rep=300, grad_to_none=leaves if train else None)
              for f in (ours, cudnn, ours, cudnn)]
    return dict(ms=min(ms[0], ms[2]), cudnn_ms=min(ms[1], ms[3]))


def run_one(tree: str, path: str, cfg, D: int, causal: bool) -> dict:
    spec = f"{','.join(map(str, cfg))}:{D}:{int(causal)}"
    cmd = [sys.executable, __file__, "--one", spec, "--table", args.table, "--seq-len", str(args.seq_len),
           "--batch", str(args.batch), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads or args.heads)]
    cmd += (["--alibi"] if args.alibi else []) + (["--time"] if args.time else [])
    env = dict(os.environ, PYTHONPATH=path, PYTHONSAFEPATH="1")
    row = dict(tree=tree, table=args.table, config=list(cfg), head_dim=D, causal=causal, alibi=args.alibi)
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return dict(row, status="timeout")
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return dict(row, status="crash", error=last[:200])
    return dict(row, **json.loads(lines[-1]))


def parent() -> None:
    trees = dict(t.split("=", 1) for t in args.trees.split(","))
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("configs", Path(__file__).resolve().parent.parent / "kernels" / "configs.py")
    configs = module_from_spec(spec)
    spec.loader.exec_module(configs)
    masks = {"both": (True, False), "yes": (True,), "no": (False,)}[args.causal]
    pinned = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")] if args.configs else None
    jobs = [(name, path, cfg, D, causal) for name, path in trees.items() for D in map(int, args.head_dims.split(","))
            for cfg in pinned or getattr(configs, args.table)["sm90"][configs.bucket(D)] for causal in masks]
    with concurrent.futures.ThreadPoolExecutor(1 if args.time else args.parallel) as pool:
        rows = list(pool.map(lambda job: run_one(*job), jobs))
    for r in rows:
        print(r, flush=True)
    if args.out_dir:
        out = Path(args.out_dir)
        (out / f"{args.name}.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
        lines = [f"# {'Backward' if args.table == 'BWD' else 'Forward'} launch configurations pinned one at a time ({'ALiBi, ' if args.alibi else ''}bf16, "
                 f"B={args.batch}, T={args.seq_len}, H={args.heads}/{args.kv_heads or args.heads})", "",
                 "GPU: " + ", ".join(sorted({f"{r['gpu']} (triton {r['triton']})" for r in rows if "gpu" in r})), "",
                 "| tree | head dim | causal | config (BLOCK_M, BLOCK_N, warps, stages) | status | max rel. error "
                 f"| {'fwd' if args.table == 'FWD' else 'fwd+bwd'} ms | cuDNN ms | vs cuDNN |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['tree']} | {r['head_dim']} | {r['causal']} | {tuple(r['config'])} | {r['status']} | "
                  f"{max(r['errors'].values()) if 'errors' in r else r.get('error', '')} | "
                  + (f"{r['ms']:.3f} | {r['cudnn_ms']:.3f} | {r['cudnn_ms'] / r['ms']:.2f}x |" if 'ms' in r else "| | |")
                  for r in rows]
        (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    child() if args.one else parent()
