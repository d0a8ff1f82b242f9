"""Speed of ``hf_ahfa.nn.MultiheadAttention`` against ``torch.nn.MultiheadAttention`` (issue 14, item 3) on
one GPU: the same weights, bf16, ``batch_first``; no mask, ``is_causal`` with its causal mask, and a
key-padding mask; forward (inference) and forward+backward. Each row first checks that both modules give
the same output (bf16 tolerance), then times both alternately (median of ``triton.testing.do_bench``).

    python scripts/mha_speed.py --out-dir OUT [--seq-lens 1024,4096,16384] [--name mha-speed]
"""

import argparse
from pathlib import Path

import torch
from triton.testing import do_bench

import hf_ahfa
from hf_ahfa.eval.report import markdown_table, provenance, write_atomic, write_json

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out-dir", required=True)
parser.add_argument("--seq-lens", default="1024,4096,16384")
parser.add_argument("--embed-dim", type=int, default=1024)
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens // length)")
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--name", default="mha-speed")
args = parser.parse_args()

E, H = args.embed_dim, args.heads
torch.manual_seed(0)
ours = hf_ahfa.nn.MultiheadAttention(E, H, batch_first=True, device="cuda", dtype=torch.bfloat16)
theirs = torch.nn.MultiheadAttention(E, H, batch_first=True, device="cuda", dtype=torch.bfloat16)
theirs.load_state_dict(ours.state_dict())


def call(mha, x, case, need_grad):
    L = x.shape[1]
    kw = dict(need_weights=False)
    if case == "causal":
        kw.update(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(L, device="cuda", dtype=x.dtype),
                  is_causal=True)
    elif case == "key-padding":
        pad = torch.zeros(x.shape[0], L, dtype=torch.bool, device="cuda")
        pad[:, L - L // 4:] = True  # the last quarter of every sequence is padding
        kw.update(key_padding_mask=pad)
    with torch.set_grad_enabled(need_grad):
        return mha(x, x, x, **kw)[0]


rows = []
for L in [int(s) for s in args.seq_lens.split(",")]:
    B = max(1, args.tokens // L)
    x = torch.randn(B, L, E, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for case in ("none", "causal", "key-padding"):
        for mode in ("fwd", "fwd+bwd"):
            train = mode == "fwd+bwd"
            ours.train(train), theirs.train(train)
            a, b = call(ours, x, case, False), call(theirs, x, case, False)
            valid = slice(0, L - L // 4) if case == "key-padding" else slice(None)  # torch's padded rows differ
            err = (a[:, valid].float() - b[:, valid].float()).abs().max().item()
            assert err < 2e-2 * b.float().abs().max().item() + 1e-2, f"L={L} {case}: outputs differ by {err}"
            times = {"ahfa": [], "torch": []}
            for _ in range(args.rounds):
                for name, mha in (("ahfa", ours), ("torch", theirs)):
                    if train:
                        g = torch.randn_like(x)
                        fn = lambda: call(mha, x, case, True).backward(g)  # noqa: E731
                    else:
                        fn = lambda: call(mha, x, case, False)  # noqa: E731
                    times[name].append(do_bench(fn, warmup=10, rep=60, grad_to_none=[x]))
            t_ours, t_theirs = sorted(times["ahfa"])[len(times["ahfa"]) // 2], sorted(times["torch"])[len(times["torch"]) // 2]
            rows.append(dict(seq_len=L, batch=B, case=case, mode=mode, ahfa_ms=t_ours, torch_ms=t_theirs,
                             speedup=t_theirs / t_ours, max_abs_diff=err))
            print(rows[-1], flush=True)

meta = {**provenance(), "embed_dim": E, "heads": H, "dtype": "bfloat16", "tokens_per_batch": args.tokens,
        "rounds": args.rounds, "timing": "median of rounds of triton do_bench medians, alternated"}
out = Path(args.out_dir)
write_json(out / f"{args.name}.json", meta, rows)
table = markdown_table(["length", "batch", "mask", "mode", "hf_ahfa.nn ms", "torch ms", "speed-up (torch/ahfa)"],
                       [[r["seq_len"], r["batch"], r["case"], r["mode"], f"{r['ahfa_ms']:.3f}", f"{r['torch_ms']:.3f}",
                         f"{r['speedup']:.2f}x"] for r in rows])
write_atomic(out / f"{args.name}.md",
             f"# hf_ahfa.nn.MultiheadAttention vs torch.nn.MultiheadAttention ({meta['gpu']})\n\n"
             f"E={E}, {H} heads, bf16, batch_first, {args.tokens} tokens per batch; torch {meta['torch']}, "
             f"triton {meta['triton']}, commit {meta['commit']}. Outputs checked equal before timing.\n\n{table}\n")
print((out / f"{args.name}.md").read_text())
