"""Whole-model speed of an all-global 0.5B-class decoder (random weights, Qwen2 layout: 24 layers, hidden 896,
GQA 14/2, head dim 64, as the model of issue 11) with ahfa against sdpa in one run: ahfa as a user gets it
(the router's choice) and ahfa on its own Triton kernels (AHFA_BACKEND=triton). Random weights and tokens:
speed only, nothing about quality.

    python scripts/model_prefill_speed.py --out-dir OUT [--seq-lens 8192,32768] [--train-lens 2048,8192]
        [--name model-speed-qwen2-0.5b]
"""

import argparse
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_ahfa  # noqa: F401  (registers "ahfa")
from hf_ahfa.eval.model_speed import measure, write_model_speed_report

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out-dir", required=True)
parser.add_argument("--seq-lens", default="8192,32768")
parser.add_argument("--decode-tokens", type=int, default=32)
parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per implementation (median reported)")
parser.add_argument("--train-lens", default="", help="lengths of a timed training step (forward+backward), e.g. 2048,8192")
parser.add_argument("--own-kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="after the routed pass, a second pass with ahfa on its own kernels")
parser.add_argument("--name", default="model-speed-qwen2-0.5b")
args = parser.parse_args()
seq_lens = [int(x) for x in args.seq_lens.split(",")]
train_lens = [int(x) for x in args.train_lens.split(",") if x]

config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, vocab_size=32000,
                              max_position_embeddings=max(seq_lens + train_lens) + args.decode_tokens + 8)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).cuda().eval()
rows = []


def report():
    """The report of the rows so far: written after each pass, so that a run cut by its time limit keeps them."""
    done = sorted(rows, key=lambda r: (r["seq_len"], r["impl"] == "sdpa"))  # the baseline last per length
    write_model_speed_report(done, {"model": "qwen2-0.5b-layout random weights", "dtype": "bfloat16",
                                    "decode_tokens": args.decode_tokens}, args.out_dir, args.name)


for backend in (None, "triton") if args.own_kernels else (None,):  # the router's choice, then our own kernels
    if backend:
        os.environ["AHFA_BACKEND"] = backend
    # prefill and decode; then a training step (its prefill column re-measured in train mode: the step's row)
    jobs = [(seq_lens, args.decode_tokens, False)] + ([(train_lens, 0, True)] if train_lens else [])
    for lens, decode, train in jobs:
        model.train(train)
        for row in measure(model, ["ahfa", "sdpa"], lens, decode, train=train, rounds=args.rounds):
            if row["impl"] == "ahfa":
                row["impl"] = "ahfa" if backend is None else "ahfa-own-kernels"
            if backend is None or row["impl"] != "sdpa":
                rows.append(row)
    model.eval()
    os.environ.pop("AHFA_BACKEND", None)
    report()
print(open(os.path.join(args.out_dir, f"{args.name}.md")).read())
