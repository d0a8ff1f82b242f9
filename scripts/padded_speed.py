"""Padded-batch prefill and training step of the 0.5B Qwen2 layout (random weights, bf16, 24 layers, GQA 14/2,
head dim 64) on one GPU: ahfa as routed (its default), our kernels alone (``AHFA_BACKEND=triton``) with the
padding vector and with Transformers' dense mask (``COMPACT_MASK_DEVICES`` emptied), and sdpa, timed in alternated
rounds (median of ``triton.testing.do_bench``).
Every row of a batch loses a different share of its tokens to left padding (0 up to ``--pad``). Each
configuration first checks that the logits at real positions agree with sdpa's (bf16 tolerance).

    python scripts/padded_speed.py --out-dir OUT [--seq-lens 2048,8192] [--batch 4] [--pad 0.5] [--rounds 3]
"""

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from triton.testing import do_bench

import hf_ahfa  # noqa: F401  (registers "ahfa")
from hf_ahfa import integration
from hf_ahfa.eval.report import markdown_table, provenance, write_atomic, write_json

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out-dir", required=True)
parser.add_argument("--seq-lens", default="2048,8192")
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--pad", type=float, default=0.5, help="the largest share of a row that is padding")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--name", default="padded-speed-qwen2-0.5b")
args = parser.parse_args()
seq_lens = [int(x) for x in args.seq_lens.split(",")]

config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, vocab_size=32000,
                              max_position_embeddings=max(seq_lens) + 8)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
COMPACT = integration.COMPACT_MASK_DEVICES
# label: (attn_implementation, devices given the padding vector, AHFA_BACKEND)
IMPLS = {"ahfa": ("ahfa", COMPACT, None), "ahfa-own": ("ahfa", COMPACT, "triton"),
         "ahfa-own-dense-mask": ("ahfa", frozenset(), "triton"), "sdpa": ("sdpa", COMPACT, None)}


def run(label, ids, mask, train):
    impl, devices, backend = IMPLS[label]
    model.set_attn_implementation(impl)
    integration.COMPACT_MASK_DEVICES = devices
    os.environ.pop("AHFA_BACKEND", None)
    if backend:
        os.environ["AHFA_BACKEND"] = backend
    model.train(train)
    if not train:
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits
    model.zero_grad(set_to_none=True)
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    return None


rows = []
for L in seq_lens:
    ids = torch.randint(0, config.vocab_size, (args.batch, L), device="cuda")
    mask = torch.ones_like(ids)
    for b in range(args.batch):  # left padding: 0, ..., pad of the row
        mask[b, :int(L * args.pad * b / max(args.batch - 1, 1))] = 0
    real = mask.bool()
    want = run("sdpa", ids, mask, False)[real].float()
    for label in IMPLS:
        err = (run(label, ids, mask, False)[real].float() - want).abs().max().item()
        assert err < 0.1 * want.abs().max().item(), f"{label} at {L}: logits differ from sdpa's by {err}"
    for mode in ("prefill", "train step"):
        times = {label: [] for label in IMPLS}
        for r in range(args.rounds):
            for label in (list(IMPLS) if r % 2 == 0 else list(IMPLS)[::-1]):
                fn = lambda label=label, train=mode == "train step": run(label, ids, mask, train)  # noqa: E731
                times[label].append(do_bench(fn, warmup=3, rep=30))
        med = {label: sorted(ts)[len(ts) // 2] for label, ts in times.items()}
        rows.append(dict(seq_len=L, batch=args.batch, max_pad=args.pad, mode=mode, ms=med, rounds_ms=times,
                         ahfa_vs_sdpa=med["sdpa"] / med["ahfa"], own_vs_sdpa=med["sdpa"] / med["ahfa-own"],
                         padding_vector_vs_dense=med["ahfa-own-dense-mask"] / med["ahfa-own"]))
        print(rows[-1], flush=True)
integration.COMPACT_MASK_DEVICES = COMPACT
os.environ.pop("AHFA_BACKEND", None)

meta = {**provenance(), "model": "qwen2-0.5b layout, random weights", "dtype": "bfloat16", "rounds": args.rounds,
        "timing": "median of alternated rounds of triton do_bench medians"}
out = Path(args.out_dir)
write_json(out / f"{args.name}.json", meta, rows)
table = markdown_table(["length", "batch", "mode", "ahfa ms", "own kernels ms", "own (dense mask) ms", "sdpa ms",
                        "ahfa vs sdpa", "own vs sdpa", "own: padding vector vs dense mask"],
                       [[r["seq_len"], r["batch"], r["mode"], *(f"{r['ms'][label]:.2f}" for label in IMPLS),
                         f"{r['ahfa_vs_sdpa']:.2f}x", f"{r['own_vs_sdpa']:.2f}x", f"{r['padding_vector_vs_dense']:.2f}x"]
                        for r in rows])
write_atomic(out / f"{args.name}.md",
             f"# Padded batches: ahfa (routed / own kernels) vs sdpa ({meta['gpu']})\n\n"
             f"0.5B Qwen2 layout, random weights, bf16; batch {args.batch}, left padding 0-{args.pad:.0%} of a row; "
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. Speed-ups are time ratios "
             f"(> 1: the first is faster).\n\n{table}\n")
print((out / f"{args.name}.md").read_text())
