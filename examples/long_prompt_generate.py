"""Generate from a long prompt (e.g. a whole book chapter) with ahfa, and compare with sdpa.

    python examples/long_prompt_generate.py --model HuggingFaceTB/SmolLM2-135M --prompt-file book.txt --tokens 8000
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ahfa  # noqa: F401  (registers attn_implementation="ahfa")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="hub name or local folder")
    p.add_argument("--prompt-file", required=True)
    p.add_argument("--tokens", type=int, default=4096, help="prompt length: the last N tokens of the file")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="ahfa", dtype=dtype).to(device).eval()
    ids = tokenizer(open(args.prompt_file, encoding="utf-8").read(), return_tensors="pt")["input_ids"][:, -args.tokens :]
    ids = ids.to(device)
    for impl in ("ahfa", "sdpa"):
        model.set_attn_implementation(impl)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, cache_implementation=args.cache)
        seconds = time.perf_counter() - start
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        print(f"[{impl}] {ids.shape[1]} prompt tokens, {args.new_tokens} new in {seconds:.2f} s: {text!r}")


if __name__ == "__main__":
    main()
