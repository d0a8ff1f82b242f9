"""One decode step's attention (one query per head, GQA) through SDPA two exact ways, timed on the GPU: with
``enable_gqa`` (Transformers' sdpa: each query head reads its KV head's cache) and packed (the ``n_rep`` query heads
of a KV head as ``n_rep`` query rows of that head, no mask: each cache is read once). On CUDA device time per call
from CUDA events over many queued calls (bf16); on the CPU wall time (float32), the two forms taking turns. Also the
two outputs' largest difference.

    python scripts/decode_gqa_pack.py [--device cuda|cpu] [--heads 14,2,64 32,8,128] [--kv-lens 1024,4096]
"""

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--heads", nargs="+", default=["14,2,64", "32,8,128", "4,1,256"], help="Hq,Hkv,D")
parser.add_argument("--kv-lens", default="1024,4096,32768,131072")
parser.add_argument("--calls", type=int, default=200)
parser.add_argument("--device", default="cuda")
parser.add_argument("--out", default=None, help="a JSON file for the rows")
args = parser.parse_args()


def device_ms(fn, calls):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # the launches queue behind it: the events time the device, not the host
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def host_ms(fn, calls):
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1e3 / calls


cuda = args.device == "cuda"
dtype, timer = (torch.bfloat16, device_ms) if cuda else (torch.float32, host_ms)
def write_markdown(result: dict, path: str) -> None:
    """The rows of ``result`` (this script's JSON) as a Markdown table."""
    lines = [f"# One decode step's attention through SDPA: enable_gqa against packed query heads ({result['device']})",
             "", f"`scripts/decode_gqa_pack.py`; {result['device']}, torch {result['torch']}, {result['dtype']}, "
             f"batch 1, {result['timing']}. Packed: each key/value head's query heads as its query rows "
             "(`hf_ahfa.router.SDPA_PACKED_DECODE_DEVICES`).", "",
             "| Hq/Hkv, D | keys | enable_gqa ms | packed ms | packed speed-up | max abs diff |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['Hq']}/{r['Hkv']}, {r['D']} | {r['kv_len']} | {r['gqa_ms']:.4f} | {r['packed_ms']:.4f} | "
              f"{r['packed_speedup']:.2f}x | {r['max_abs_diff']:.1e} |" for r in result["rows"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


rows = []
for heads in args.heads:
    Hq, Hkv, D = map(int, heads.split(","))
    for K in map(int, args.kv_lens.split(",")):
        q = torch.randn(1, Hq, 1, D, device=args.device, dtype=dtype)
        k, v = (torch.randn(1, Hkv, K, D, device=args.device, dtype=dtype) for _ in range(2))

        def gqa():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        def packed():
            return F.scaled_dot_product_attention(q.view(1, Hkv, Hq // Hkv, D), k, v).view(1, Hq, 1, D)

        err = (gqa().float() - packed().float()).abs().max().item()
        times = {"gqa": [], "packed": []}
        for _ in range(3 if cuda else 5):  # the two taking turns: the host's drift favours neither
            for name, fn in (("gqa", gqa), ("packed", packed)):
                times[name].append(timer(fn, args.calls if cuda else max(3, args.calls // 10)))
        row = {"Hq": Hq, "Hkv": Hkv, "D": D, "kv_len": K, "gqa_ms": statistics.median(times["gqa"]),
               "packed_ms": statistics.median(times["packed"]), "max_abs_diff": err}
        row["packed_speedup"] = row["gqa_ms"] / row["packed_ms"]
        rows.append(row)
        print(json.dumps(row))
if args.out:  # and a Markdown table beside it
    result = {"device": torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, "
              f"{torch.get_num_threads()} threads", "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "timing": "device time of queued calls (CUDA events), median of 3 alternating batches" if cuda
              else "wall time, median of 5 alternating batches", "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(result, args.out.removesuffix(".json") + ".md")
