"""Python host time of one call on our own kernels with the Triton launches stubbed out: what the checks, the
router and the launch wrappers cost per call (Triton's own launcher not included). CPU, no GPU needed (the
interpreter's flag only lets the wrappers accept CPU tensors; nothing is interpreted). Run it on two trees
(PYTHONPATH) to compare; each run appends one JSON line.

    python scripts/launch_host_cost.py --label after --jsonl OUT.jsonl
    python scripts/launch_host_cost.py --report OUT.jsonl --out-dir eval/results --name launch-host-cost-cpu
"""

import argparse
import json
import os
import platform
import timeit
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the wrappers then take CPU tensors

import torch  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--label", help="name of the tree measured")
parser.add_argument("--jsonl", help="append this run's row here")
parser.add_argument("--report", help="a JSONL of runs to write as JSON + Markdown")
parser.add_argument("--out-dir", type=Path)
parser.add_argument("--name", default="launch-host-cost-cpu")
args = parser.parse_args()

if args.report:
    rows = [json.loads(line) for line in open(args.report)]
    cases = list(rows[0]["us"])
    import triton

    meta = dict(machine=platform.machine(), torch=torch.__version__, triton=triton.__version__,
                note="best of 7 repeats of 2000 calls, Triton launches stubbed; microseconds per call")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = [f"# Host time per call on our own kernels, Triton launches stubbed (CPU; torch {torch.__version__}, "
             f"triton {triton.__version__})", "", meta["note"], "",
             "| tree | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    lines += [f"| {r['label']} | " + " | ".join(f"{r['us'][c]:.1f}" for c in cases) + " |" for r in rows]
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    raise SystemExit

import hf_ahfa  # noqa: E402
import hf_ahfa.kernels.flash as flash  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **kw: None


for kernel in ("flash_decode_kernel", "flash_decode_combine_kernel", "flash_fwd_kernel"):
    setattr(flash, kernel, _NoLaunch())
torch.manual_seed(0)
CASES = {  # (q, k = v, keyword arguments): a Gemma-style decode step, a short inference prefill
    "decode K=1024 softcap": (torch.randn(1, 1, 9, 64), torch.randn(1, 1024, 3, 64), dict(causal=True, softcap=30.0)),
    "prefill Q=K=64": (torch.randn(1, 64, 9, 64), torch.randn(1, 64, 3, 64), dict(causal=True)),
}
us = {}
for case, (q, k, kw) in CASES.items():
    def call(q=q, k=k, kw=kw):
        return hf_ahfa.attention(q, k, k, backend="triton", **kw)

    for _ in range(200):
        call()
    us[case] = min(timeit.repeat(call, number=2000, repeat=7)) / 2000 * 1e6
row = dict(label=args.label, us=us)
print(row)
if args.jsonl:
    with open(args.jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")
