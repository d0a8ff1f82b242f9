"""Decode speed with a static cache, compiled as Transformers compiles it, on the 0.5B Qwen2 layout of issue 11
(random weights, bf16, 24 layers, GQA 14/2, head dim 64) on one GPU: ahfa against sdpa, alternating rounds.

``generate(cache_implementation="static")`` compiles each decode step (``torch.compile``, mode
"reduce-overhead": CUDA graphs), so the host's time per call drops out and the attention kernels are compared.
The static cache holds ``prompt + new`` slots: early steps find most of it empty (sdpa reads every slot,
ahfa's decode kernel only the filled ones). Decode seconds = time of ``new + 1`` generated tokens minus the time
of 1 (both prefill once), median over rounds; the first call per implementation and length compiles (untimed).

    python scripts/static_decode_speed.py --out-dir OUT [--prompt-lens 1024,8192,32768] [--new 128] [--rounds 5]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_ahfa  # noqa: F401  (registers "ahfa")
from hf_ahfa.eval.report import markdown_table, provenance, write_atomic, write_json

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out-dir", required=True)
parser.add_argument("--prompt-lens", default="1024,8192,32768")
parser.add_argument("--new", type=int, default=128, help="timed decode steps per generate")
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--name", default="static-decode-speed-qwen2-0.5b")
parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (Transformers compiles on GPUs)")
args = parser.parse_args()
lens = [int(x) for x in args.prompt_lens.split(",")]
IMPLS = ("ahfa", "sdpa")

config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, vocab_size=32000,
                              max_position_embeddings=max(lens) + args.new + 8)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).to(args.device).eval()
sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)


def generate(impl: str, ids: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    """Seconds of one greedy ``generate`` of ``new`` tokens with a static cache, and the tokens."""
    model.set_attn_implementation(impl)
    sync()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         cache_implementation="static", pad_token_id=0)
    sync()
    return time.perf_counter() - start, out[:, ids.shape[1]:]


rows = []
for L in lens:
    ids = torch.randint(0, config.vocab_size, (1, L), device=args.device)
    tokens = {impl: generate(impl, ids, args.new + 1)[1] for impl in IMPLS}  # compiles; the tokens compared
    same = int((tokens["ahfa"] == tokens["sdpa"]).cumprod(-1).sum())  # greedy steps before the first difference
    per_step = {impl: [] for impl in IMPLS}
    for r in range(args.rounds):
        for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
            full, _ = generate(impl, ids, args.new + 1)
            prefill, _ = generate(impl, ids, 1)
            per_step[impl].append((full - prefill) / args.new)
    med = {impl: statistics.median(ts) for impl, ts in per_step.items()}
    rows.append(dict(prompt_len=L, new=args.new, ms_per_token={i: 1e3 * t for i, t in med.items()},
                     rounds_ms={i: [1e3 * t for t in ts] for i, ts in per_step.items()},
                     ahfa_vs_sdpa=med["sdpa"] / med["ahfa"], greedy_steps_identical=same))
    print(rows[-1], flush=True)

meta = {**provenance(), "model": "qwen2-0.5b layout, random weights", "dtype": "bfloat16", "rounds": args.rounds,
        "timing": "(generate of new+1 tokens - generate of 1) / new, median over alternated rounds"}
out = Path(args.out_dir)
write_json(out / f"{args.name}.json", meta, rows)
table = markdown_table(["prompt", "new tokens", "ahfa ms/token", "sdpa ms/token", "ahfa vs sdpa",
                        "greedy tokens equal before the first difference"],
                       [[r["prompt_len"], r["new"], f"{r['ms_per_token']['ahfa']:.3f}",
                         f"{r['ms_per_token']['sdpa']:.3f}", f"{r['ahfa_vs_sdpa']:.2f}x",
                         f"{r['greedy_steps_identical']} of {r['new'] + 1}"] for r in rows])
write_atomic(out / f"{args.name}.md",
             f"# Static-cache compiled decode: ahfa vs sdpa ({meta['gpu']})\n\n"
             f"0.5B Qwen2 layout, random weights, bf16, batch 1, `generate(cache_implementation=\"static\")` (each "
             f"decode step compiled, CUDA graphs); torch {meta['torch']}, triton {meta['triton']}, commit "
             f"{meta['commit']}. Speed-ups are time ratios (> 1: ahfa is faster).\n\n{table}\n")
print((out / f"{args.name}.md").read_text())
