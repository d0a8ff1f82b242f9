"""Whole-model speed of a decoder built from a config with random weights, with ahfa against a baseline (sdpa unless
``--baseline`` says otherwise) in one run: ahfa as a user gets it (the router's choice) and ahfa on its own Triton
kernels (AHFA_BACKEND=triton). Random weights and tokens: speed only, nothing about quality. Layouts: ``qwen2`` (the
all-global 0.5B model of issue 11: 24 layers, hidden 896, GQA 14/2, head dim 64), ``gemma3`` (Gemma-3-270m's shape:
18 layers, hidden 640, 4/1 heads, head dim 256, a 512-token window on five layers of every six, 262K-word
vocabulary) and ``gemma2`` (Gemma-2-2b's: 26 layers, hidden 2304, GQA 8/4, head dim 256, scores softcapped at 50, a
4096-token window on every other layer; Transformers' sdpa does not compute the softcap, so compare with
``--baseline eager``, the attention such a model runs otherwise; ``gemma2-small``: the same attention at
SmolLM2-135M's widths, 30 layers, hidden 576, GQA 9/3, head dim 64); ``-host`` layouts: the same layers and heads
at tiny widths, where a decode step is the host's time (``gptoss-host``: GptOssConfig's 36 layers, GQA 64/8, sinks,
a 128-token window on every other layer; against ``--baseline eager`` too).

    python scripts/model_prefill_speed.py --out-dir OUT [--layout qwen2|gemma3|gemma2|gemma2-small|gptoss-host]
        [--seq-lens 8192,32768] [--train-lens 2048,8192] [--prefill-logits all|last] [--baseline sdpa|eager]
        [--name model-speed-qwen2-0.5b]
    python scripts/model_prefill_speed.py --out-dir OUT --layout gemma3 --seq-lens 32768 --save-model DIR \
        --tokenizer MODEL_DIR          (the random model as a folder for ahfa-eval, then exit)
"""

import argparse
import collections
import cProfile
import io
import json
import os
import pstats

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_ahfa
from hf_ahfa import fastest, router
from hf_ahfa.eval.model_speed import (attach_paired, decode_once, measure, paired_decode, paired_prefill,
                                      write_model_speed_report)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out-dir", required=True)
parser.add_argument("--seq-lens", default="8192,32768")
parser.add_argument("--decode-tokens", type=int, default=32)
parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per implementation (median reported)")
parser.add_argument("--train-lens", default="", help="lengths of a timed training step (forward+backward), e.g. 2048,8192")
parser.add_argument("--own-kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="after the routed pass, a second pass with ahfa on its own kernels")
parser.add_argument("--layout", choices=("qwen2", "qwen2-host", "gemma3", "gemma2", "gemma2-host", "gemma2-small",
                                         "gptoss-host"),
                    default="qwen2",
                    help="-host: the layout's layers and heads at tiny widths (hidden 64, head dim 8), where a decode "
                         "step is the host's time: what ahfa adds per call; gemma2-small: Gemma-2's attention at "
                         "SmolLM2-135M's widths (a CPU-sized softcapped model); gptoss-host: GptOssConfig's layers, "
                         "heads, sinks and windows, 4 experts (compare with --baseline eager)")
parser.add_argument("--baseline", default="sdpa",
                    help="the attention implementation ahfa is compared with (eager for softcapped models: sdpa "
                         "leaves their softcap out)")
parser.add_argument("--floor", action="store_true",
                    help="with --paired: also a bare SDPA call in Transformers' place (no attention function's host "
                         "time) paired against sdpa, noted in the report: the floor of a host-bound run")
parser.add_argument("--no-packed-decode", action="store_true",
                    help="GQA decode steps through SDPA's enable_gqa on every device (as on CUDA), not packed")
parser.add_argument("--prefill-logits", choices=("all", "last"), default="all",
                    help="the timed prefill's logits: every position's, or the last only (as generate() prefills)")
parser.add_argument("--device", default="cuda", help="cuda (bf16), or cpu (float32) to try the script")
parser.add_argument("--routes", action="store_true",
                    help="also write <name>-routes.json: each layer's route in one routed prefill per length, the "
                         "router's timed decisions, and cProfiles of the routed and the baseline's prefill (and decode "
                         "steps) at the first length (on CUDA also the prefills' device kernels, from torch.profiler)")
parser.add_argument("--paired", type=int, default=0, metavar="N",
                    help="also time routed ahfa and baseline prefills (and --decode-tokens steps of decoding) as N "
                         "pairs of single calls taking turns, and report the speed-up's 95%% paired interval (a "
                         "host-bound model's rounds drift)")
parser.add_argument("--ones-mask", action="store_true",
                    help="with --paired: the paired prefills get an all-ones attention_mask, as generate() passes one")
parser.add_argument("--paired-aa", action="store_true",
                    help="with --paired: also the baseline against itself (an A/A run: the paired measurement's own "
                         "bias and spread on this host), in the report's notes")
parser.add_argument("--prefer", default="", metavar="NAMES",
                    help="after the rounds, every timed decision with one of these candidates (e.g. sdpa,sdpa-whole) "
                         "takes the fastest of them (hf_ahfa.fastest.prefer) for --paired and --routes")
parser.add_argument("--name", default=None, help="report name (default model-speed-<layout>)")
parser.add_argument("--save-model", default=None, metavar="DIR",
                    help="save the random-weights model (float32) with --tokenizer's files to DIR and exit: a folder "
                         "that `ahfa-eval train --model DIR` loads (long-context runs of a layout without its weights)")
parser.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="with --save-model: a local model folder whose tokenizer is saved beside the weights (its "
                         "ids must be below the layout's vocabulary size)")
args = parser.parse_args()
BASE = args.baseline
if args.floor and BASE != "sdpa":
    parser.error("--floor pairs a bare SDPA call against sdpa: it needs --baseline sdpa")
seq_lens = [int(x) for x in args.seq_lens.split(",")]
train_lens = [int(x) for x in args.train_lens.split(",") if x]

positions = max(seq_lens + train_lens) + args.decode_tokens + 8
if args.layout == "qwen2":
    config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2, vocab_size=32000,
                                  max_position_embeddings=positions)
    name, described = args.name or "model-speed-qwen2-0.5b", "qwen2-0.5b-layout random weights"
elif args.layout == "qwen2-host":
    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=64, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2, head_dim=8, vocab_size=128,
                                  max_position_embeddings=positions)
    name, described = args.name or "model-speed-qwen2-host", "qwen2-layout host-bound (tiny widths) random weights"
elif args.layout.startswith("gemma2"):  # Gemma2Config's defaults are Gemma-2-2b's
    widths = {"gemma2": {}, "gemma2-host": dict(hidden_size=64, intermediate_size=64, head_dim=8, vocab_size=128),
              "gemma2-small": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, head_dim=64, vocab_size=49152)}[args.layout]
    config = AutoConfig.for_model("gemma2", max_position_embeddings=positions, **widths)
    name, described = args.name or f"model-speed-{args.layout}", f"{args.layout}-layout (softcap 50) random weights"
elif args.layout == "gptoss-host":  # GptOssConfig's defaults: 36 layers, 64/8 heads
    config = AutoConfig.for_model("gpt_oss", hidden_size=64, intermediate_size=64, head_dim=8, vocab_size=128,
                                  num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=positions)
    name, described = args.name or "model-speed-gptoss-host", "gpt-oss-layout host-bound (tiny widths) random weights"
else:
    config = AutoConfig.for_model("gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                                  vocab_size=262144, max_position_embeddings=positions)
    name, described = args.name or "model-speed-gemma3-270m-layout", "gemma3-270m-layout random weights"
torch.manual_seed(0)
if args.save_model:
    if not args.tokenizer:
        parser.error("--save-model needs --tokenizer DIR (a local model folder with a tokenizer)")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if len(tokenizer) > config.vocab_size:
        parser.error(f"--tokenizer has {len(tokenizer)} ids, above the layout's vocabulary of {config.vocab_size}")
    AutoModelForCausalLM.from_config(config).save_pretrained(args.save_model)
    tokenizer.save_pretrained(args.save_model)
    print(f"saved {described} ({config.max_position_embeddings} positions) to {args.save_model}")
    raise SystemExit
dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
model = AutoModelForCausalLM.from_config(config, attn_implementation=BASE, dtype=dtype).to(args.device).eval()
rows, notes = [], {}  # notes on the run in the report: --prefer, --paired-aa, --floor, --no-packed-decode
if args.no_packed_decode:
    router.SDPA_PACKED_DECODE_DEVICES = frozenset()
    notes["packed decode"] = "off"


def report():
    """The report of the rows so far: written after each pass, so that a run cut by its time limit keeps them."""
    done = sorted(rows, key=lambda r: (r["seq_len"], r["impl"] == BASE))  # the baseline last per length
    meta = {"model": described, "dtype": str(dtype).removeprefix("torch."), "decode_tokens": args.decode_tokens,
            "prefill_logits": args.prefill_logits, **notes}
    write_model_speed_report(done, meta, args.out_dir, name)


def paired_note(label, policies=None):
    """``label`` paired against the baseline, prefill and (with decode tokens) decode:
    ``{"<label> [decode ]<L>": ratio}``."""
    found = paired_prefill(model, [label, BASE], seq_lens, args.paired, last_logits=args.prefill_logits == "last",
                           policies=policies)
    if args.decode_tokens:
        found.update({(f"{name} decode", L): r for (name, L), r in
                      paired_decode(model, [label, BASE], seq_lens, args.paired, args.decode_tokens,
                                    policies=policies).items()})
    note = {f"{name} {L}": f"{r['speedup']:.3f} ({r['low']:.3f}-{r['high']:.3f})" for (name, L), r in found.items()}
    print(label, note)
    return note


def bare_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``--floor``: Transformers' plain calls (no mask: causal prompts, decode steps) as one SDPA call and the
    transpose, nothing else; every other call through Transformers' sdpa function."""
    if attention_mask is not None or dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    Q, K = query.shape[2], key.shape[2]
    causal = Q > 1 and getattr(module, "is_causal", True)
    if causal and Q < K:  # top-left causal (a static cache's empty tail)
        key, value = key[:, :, :Q], value[:, :, :Q]
    out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


if args.floor:
    AttentionInterface.register("sdpa-bare", bare_sdpa)
    AttentionMaskInterface.register("sdpa-bare", sdpa_mask)

for backend in (None, "triton") if args.own_kernels else (None,):  # the router's choice, then our own kernels
    if backend:
        os.environ["AHFA_BACKEND"] = backend
    # prefill and decode; then a training step (its prefill column re-measured in train mode: the step's row)
    jobs = [(seq_lens, args.decode_tokens, False)] + ([(train_lens, 0, True)] if train_lens else [])
    for lens, decode, train in jobs:
        model.train(train)
        for row in measure(model, ["ahfa", BASE], lens, decode, train=train, rounds=args.rounds,
                           last_logits=args.prefill_logits == "last"):
            if row["impl"] == "ahfa":
                row["impl"] = "ahfa" if backend is None else "ahfa-own-kernels"
            if backend is None or row["impl"] != BASE:
                rows.append(row)
    model.eval()
    os.environ.pop("AHFA_BACKEND", None)
    report()
if args.prefer:  # noted in the report: a run where nothing changed is the routed run again
    notes["prefer"] = f"{args.prefer}: {fastest.prefer(tuple(args.prefer.split(',')))} decisions changed"
    print(notes["prefer"])
if args.paired:
    attach_paired(rows, paired_prefill(model, ["ahfa", BASE], seq_lens, args.paired,
                                       last_logits=args.prefill_logits == "last", ones_mask=args.ones_mask))
    if args.ones_mask:
        notes["ones mask"] = "the paired prefills pass an all-ones attention_mask (as generate() does)"
    if args.decode_tokens:
        attach_paired(rows, paired_decode(model, ["ahfa", BASE], seq_lens, args.paired, args.decode_tokens),
                      "decode")
    if args.paired_aa:  # two labels of one implementation: what "no difference" measures here
        notes["a/a"] = paired_note(f"{BASE}-again", {f"{BASE}-again": (BASE, None)})
    if args.floor:  # the attention function's host time taken away: what no attention function can beat
        notes["floor"] = paired_note("sdpa-bare")
    report()
if args.routes:  # where the routed prefill goes: each layer's route, the timed choices, the host's time
    model.set_attn_implementation("ahfa")
    routes, keep = {}, {"logits_to_keep": 1} if args.prefill_logits == "last" else {}
    with torch.no_grad():
        for L in seq_lens:
            ids = torch.randint(0, config.vocab_size, (1, L), device=args.device)
            with hf_ahfa.record() as rec:
                model(ids, **keep)
            routes[L] = dict(collections.Counter(f"layer {r['layer']}: {r['route']} ({r['backend']})" for r in rec))
        ids = torch.randint(0, config.vocab_size, (1, seq_lens[0]), device=args.device)
        profiles = {}
        for impl in ("ahfa", BASE):  # the same prefills under each: where the host's time differs
            model.set_attn_implementation(impl)
            model(ids, **keep)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                model(ids, **keep)
            if args.device == "cuda":
                torch.cuda.synchronize()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
            profiles[f"profile of 20 prefills of {seq_lens[0]} tokens, {impl}"] = text.getvalue().splitlines()
            if args.device == "cuda":  # the device's side: which kernels each implementation runs, and how long
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as kernels:
                    for _ in range(5):
                        model(ids, **keep)
                    torch.cuda.synchronize()
                table = kernels.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
                profiles[f"device kernels of 5 prefills of {seq_lens[0]} tokens, {impl}"] = table.splitlines()
            if args.decode_tokens:  # the decode steps on the prompt's cache, the host's side
                decode_once(model, ids, args.decode_tokens, torch.device(args.device))
                prof = cProfile.Profile()
                decode_once(model, ids, args.decode_tokens, torch.device(args.device), around=prof)
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
                profiles[f"profile of {args.decode_tokens} decode steps after {seq_lens[0]} tokens, {impl}"] = \
                    text.getvalue().splitlines()
    with open(os.path.join(args.out_dir, f"{name}-routes.json"), "w") as f:
        json.dump({"routes": routes, "decisions": fastest.chosen(), "timings_ms": fastest.measured(), **profiles},
                  f, indent=1)
    print(json.dumps(routes, indent=1), json.dumps(fastest.measured(), indent=1),
          *("\n".join(lines[:50]) for lines in profiles.values()), sep="\n")
print(open(os.path.join(args.out_dir, f"{name}.md")).read())
