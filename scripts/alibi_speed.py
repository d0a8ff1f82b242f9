"""Cost of ALiBi in our own kernels (issue 14 target: ALiBi >= 0.95x the same kernel without it): one GPU,
bf16, ``hf_ahfa.attention(..., backend="triton")`` with and without ``alibi_slopes`` (per-head slopes as
Bloom's), prefill forward and forward+backward, causal and full, and the split-KV decode; timed alternately
(median of the rounds' ``triton.testing.do_bench`` medians). Nothing about SDPA: the ratio is the bias's cost.
``--forms distance,keys,fwd-keys`` times each form of the bias (``AHFA_ALIBI``) in the same rounds; bidirectional
calls of many queries have the distance form only.

    python scripts/alibi_speed.py --out-dir OUT [--seq-lens 4096,16384] [--head-dims 64,128] [--forms fwd-keys]
        [--name alibi-speed]
"""

import argparse
from pathlib import Path

import torch
from triton.testing import do_bench

import hf_ahfa
from hf_ahfa.kernels import common
from hf_ahfa.eval.report import markdown_table, provenance, write_atomic, write_json

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out-dir", required=True)
parser.add_argument("--seq-lens", default="4096,16384")
parser.add_argument("--head-dims", default="64,128")
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens // length)")
parser.add_argument("--decode-len", type=int, default=32768)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--forms", default="fwd-keys", help="forms of the causal bias to time (AHFA_ALIBI values)")
parser.add_argument("--name", default="alibi-speed")
args = parser.parse_args()

H = args.heads
slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda")  # Bloom's, H a power of 2


def timed(fn, grads):
    return do_bench(fn, warmup=10, rep=60, grad_to_none=grads)


def compare(case: dict, make, forms):
    """Alternate rounds of ``make(alibi)`` (a callable to time and its grad leaves) without ALiBi (``alibi`` False)
    and with it in each of ``forms``."""
    variants = [False, *forms]
    times = {a: [] for a in variants}
    for r in range(args.rounds):
        for alibi in (variants if r % 2 == 0 else variants[::-1]):
            if alibi:
                common.ALIBI_FORM = alibi
            fn, grads = make(bool(alibi))
            times[alibi].append(timed(fn, grads))
    median = {a: sorted(t)[len(t) // 2] for a, t in times.items()}
    row = dict(case, plain_ms=median[False], **{f"{f}_ms": median[f] for f in forms},
               **{f"{f}_ratio": median[False] / median[f] for f in forms})
    print(row, flush=True)
    return row


FORMS = args.forms.split(",")
for f in FORMS:
    if f not in common.ALIBI_FORMS:
        parser.error(f"--forms: some of {', '.join(common.ALIBI_FORMS)}, got {f!r}")
rows = []
for D in [int(d) for d in args.head_dims.split(",")]:
    for T in [int(t) for t in args.seq_lens.split(",")]:
        B = max(1, args.tokens // T)
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
        for causal in (True, False):
            for mode in ("fwd", "fwd+bwd"):
                def make(alibi, causal=causal, mode=mode, q=q, k=k, v=v):
                    kw = dict(causal=causal, backend="triton", alibi_slopes=slopes if alibi else None)
                    if mode == "fwd":
                        return (lambda: hf_ahfa.attention(q.detach(), k.detach(), v.detach(), **kw)), None
                    g = torch.randn_like(q)
                    return (lambda: hf_ahfa.attention(q, k, v, **kw).backward(g)), [q, k, v]

                rows.append(compare(dict(kind="prefill", head_dim=D, seq_len=T, batch=B, causal=causal, mode=mode),
                                    make, FORMS if causal else ["distance"]))
    K = args.decode_len
    qd = torch.randn(8, 1, H, D, device="cuda", dtype=torch.bfloat16)
    kd, vd = (torch.randn(8, K, H, D, device="cuda", dtype=torch.bfloat16) for _ in "kv")

    def make_decode(alibi):
        kw = dict(causal=True, backend="triton", alibi_slopes=slopes if alibi else None)
        return (lambda: hf_ahfa.attention(qd, kd, vd, **kw)), None

    rows.append(compare(dict(kind="decode", head_dim=D, seq_len=K, batch=8, causal=True, mode="fwd"), make_decode,
                        FORMS))

meta = {**provenance(), "heads": H, "dtype": "bfloat16", "tokens_per_batch": args.tokens, "rounds": args.rounds,
        "timing": "median of alternated rounds of triton do_bench medians; backend='triton' (our kernels only)"}
out = Path(args.out_dir)
write_json(out / f"{args.name}.json", meta, rows)
table = markdown_table(["kind", "head dim", "length", "batch", "causal", "mode", "no ALiBi ms",
                        *[f"ALiBi ({f}) ms" for f in FORMS], *[f"ALiBi ({f}) speed" for f in FORMS]],
                       [[r["kind"], r["head_dim"], r["seq_len"], r["batch"], r["causal"], r["mode"],
                         f"{r['plain_ms']:.3f}", *[f"{r[f + '_ms']:.3f}" if f + "_ms" in r else "" for f in FORMS],
                         *[f"{r[f + '_ratio']:.3f}x" if f + "_ratio" in r else "" for f in FORMS]] for r in rows])
write_atomic(out / f"{args.name}.md",
             f"# ALiBi in our Triton kernels ({meta['gpu']})\n\n{H} heads, bf16, {args.tokens} tokens per batch; "
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. Speed: no-ALiBi time / ALiBi "
             f"time.\n\n{table}\n")
print((out / f"{args.name}.md").read_text())
