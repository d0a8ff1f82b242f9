"""Host (Python) time of one attention call: ahfa's Transformers attention function against Transformers'
own sdpa function on tiny decode tensors (the kernel costs a few microseconds, so the difference is what
ahfa adds per call: checks, routing, layout). CPU by default; on a GPU pass --device cuda.

    python scripts/host_overhead.py [--device cpu] [--out-dir eval/results --name host-overhead-cpu]
"""

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import time
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

import hf_ahfa

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cpu")
parser.add_argument("--kv-lens", default="16,1024", help="cache lengths, comma-separated")
parser.add_argument("--q-len", type=int, default=1, help="queries per call (1: decode; K: a prefill of K tokens)")
parser.add_argument("--window", type=int, default=None,
                    help="a sliding layer's window (sdpa gets the causal window mask Transformers builds once per "
                         "forward, ahfa the sliding_window argument)")
parser.add_argument("--heads", default="9,3,64", help="query heads, key/value heads, head dim (SmolLM2-135M's)")
parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of 1000 calls per implementation")
parser.add_argument("--out-dir", help="write <name>.json and <name>.md here")
parser.add_argument("--name", default="host-overhead")
parser.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also write <name>-profile.txt: cProfile of N ahfa calls per KV length and ahfa "
                         "implementation (by own time)")
args = parser.parse_args()

impls = {"sdpa": sdpa_attention_forward, "ahfa": AttentionInterface._global_mapping["ahfa"]}
if args.device.startswith("cuda"):  # on a GPU also ahfa held to its own kernels (the split-KV Triton decode)
    impls["ahfa-own-kernels"] = impls["ahfa"]
Hq, Hkv, D = (int(x) for x in args.heads.split(","))
# a decoder layer's attention module, Transformers' own on a real config: the functions read its attributes and
# its config as in a model (a stand-in namespace hid the ~2 us that a missing config attribute cost ahfa per call)
config = AutoConfig.for_model("qwen2", hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv,
                              head_dim=D, num_hidden_layers=1, intermediate_size=64, vocab_size=64)
module = Qwen2Attention(config, layer_idx=0).eval()
module.sliding_window = args.window
sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
rows, profiles = [], []
for K in (int(x) for x in args.kv_lens.split(",")):
    Q = min(args.q_len, K)
    dtype = getattr(torch, args.dtype)
    q = torch.randn(1, Hq, Q, D, device=args.device, dtype=dtype)
    k, v = (torch.randn(1, Hkv, K, D, device=args.device, dtype=dtype) for _ in "kv")
    masks = dict.fromkeys(impls)
    if args.window:  # Transformers' (B, 1, Q, K) mask of a sliding layer, True = visible
        i, j = torch.arange(K - Q, K, device=args.device)[:, None], torch.arange(K, device=args.device)
        masks["sdpa"] = ((j <= i) & (i - j < args.window))[None, None]
    times = {name: [] for name in impls}
    for _ in range(args.rounds):
        for name, fn in impls.items():
            os.environ.pop("AHFA_BACKEND", None)
            if name == "ahfa-own-kernels":
                os.environ["AHFA_BACKEND"] = "triton"
            for _ in range(50):
                fn(module, q, k, v, masks[name], scaling=0.125, dropout=0.0, sliding_window=args.window)
            sync()
            ts = []
            for _ in range(1000):
                t = time.perf_counter()
                fn(module, q, k, v, masks[name], scaling=0.125, dropout=0.0, sliding_window=args.window)
                ts.append(time.perf_counter() - t)
            times[name].append(statistics.median(ts) * 1e6)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name in [n for n in impls if n.startswith("ahfa")] if args.profile else []:
        # where the call's host time goes (functions by own time)
        os.environ.pop("AHFA_BACKEND", None)
        if name == "ahfa-own-kernels":
            os.environ["AHFA_BACKEND"] = "triton"
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.profile):
            impls[name](module, q, k, v, None, scaling=0.125, dropout=0.0, sliding_window=args.window)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        profiles.append(f"## KV length {K}, {args.profile} calls of {name}\n{text.getvalue()}")
    os.environ.pop("AHFA_BACKEND", None)
    rows.append(dict(kv_len=K, us=times, median_us=med, ahfa_extra_us=med["ahfa"] - med["sdpa"]))
    print(f"K={K}: " + ", ".join(f"{name} {us:.1f} us" for name, us in med.items()) + " per call")
if args.out_dir:
    out = Path(args.out_dir)
    meta = dict(device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                machine=platform.machine(),
                torch=torch.__version__, hf_ahfa=hf_ahfa.__file__, rounds=args.rounds, q_len=args.q_len,
                heads=args.heads, window=args.window, dtype=args.dtype,
                direct_launch=os.environ.get("AHFA_DIRECT_LAUNCH", "1"),
                note="median of 1000 calls per round, rounds interleaved; host time of the whole attention function")
    (out / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    title = (f"# Host time per attention call ({meta['device']}, torch {torch.__version__}, {args.q_len} queries, "
             f"heads {args.heads}, window {args.window}, {args.dtype}, "
             f"AHFA_DIRECT_LAUNCH={meta['direct_launch']})")
    lines = [title, "", meta["note"], "",
             "| KV length | " + " | ".join(f"{name} us (rounds)" for name in impls) + " | ahfa extra us |",
             "|---|" + "---|" * (len(impls) + 1)]
    lines += [f"| {r['kv_len']} | " + " | ".join(" ".join(f"{x:.1f}" for x in r["us"][name]) for name in impls)
              + f" | {r['ahfa_extra_us']:.1f} |" for r in rows]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    if profiles:
        (out / f"{args.name}-profile.txt").write_text("\n".join(profiles))
    print(f"wrote {out / (args.name + '.json')}, {out / (args.name + '.md')}")
