"""Context parallelism over the GPUs of one host against one GPU, in one run: torch's ring engine with ahfa's steps
(``hf_ahfa.attention`` and an ``attn_implementation="ahfa"`` model inside torch's ``context_parallel()``).

    torchrun --nproc_per_node N scripts/context_parallel_speed.py --out-dir OUT [--seq-lens 131072,262144]
        [--what attention,model] [--taus 0.99] [--check-len 16384] [--rounds 3] [--name context-parallel]

* Check (``--check-len``): each rank's output, lse and q/k/v gradients of the ring against the whole sequence run
  on one device (every rank computes it), as relative max errors; exact and each adaptive tau.
* Speed, per length: attention prefill (forward) and training (forward + backward) of one sequence
  (Qwen2.5-0.5B's attention: 14 query heads, 2 KV heads, head dim 64, causal), and the whole model's prefill
  (Qwen2 0.5B layout, random weights, last token's logits only), on N ranks against rank 0 alone; alternating
  rounds, medians; the ring's time is the slowest rank's. A one-device run that runs out of memory is recorded
  as such (the lengths that only the ring can run).

Random weights and inputs: speed and equality only, nothing about quality. Runs on CPU processes too (gloo,
float32; small lengths) as a smoke test. Writes ``<name>.json`` and ``<name>.md`` (rank 0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import context_parallel

import hf_ahfa
from hf_ahfa.context_parallel import shard_sequence
from hf_ahfa.eval.report import markdown_table, provenance, write_json

HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out-dir", required=True)
parser.add_argument("--seq-lens", default="131072,262144")
parser.add_argument("--what", default="attention,model", help="attention and/or model")
parser.add_argument("--taus", default="0.99", help="adaptive taus beside exact ('' for exact only)")
parser.add_argument("--check-len", type=int, default=16384)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--layers", type=int, default=24, help="the model's layers (Qwen2 0.5B: 24)")
parser.add_argument("--name", default="context-parallel")
args = parser.parse_args()

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda") if cuda else torch.device("cpu")
dtype = torch.bfloat16 if cuda else torch.float32
mesh = init_device_mesh(device.type, (world,))
MODES = {"exact": dict(mode="exact")} | {f"adaptive tau={t}": dict(mode="adaptive", tau=float(t))
                                          for t in args.taus.split(",") if t}
# the check: the ring must give what one device gives; at tau = 1 every block is kept, so adaptive equals exact
CHECK_MODES = {"exact": dict(mode="exact"), "adaptive tau=1": dict(mode="adaptive", tau=1.0, density_limit=1.0)}


def say(*parts):
    if rank == 0:
        print(*parts, flush=True)


def inputs(T: int, grad: bool):
    """The same q, k, v and output gradient on every rank (seeded by T)."""
    g = torch.Generator(device).manual_seed(T)
    shapes = [(1, T, HEADS, HEAD_DIM), (1, T, KV_HEADS, HEAD_DIM), (1, T, KV_HEADS, HEAD_DIM), (1, T, HEADS, HEAD_DIM)]
    q, k, v, gout = (torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes)
    return [x.requires_grad_(grad) for x in (q, k, v)], gout


def ring_scope(T: int):
    """torch's context_parallel() over all ranks, entered as a user enters it (a positions buffer of length T)."""
    return context_parallel(mesh, buffers=[torch.arange(T, device=device)[None]], buffer_seq_dims=[1])


def relative_error(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def check(T: int) -> list[dict]:
    rows = []
    for mode, fields in CHECK_MODES.items():
        policy = hf_ahfa.AdaptivePolicy(**fields)
        (q, k, v), gout = inputs(T, grad=True)
        want, want_lse = hf_ahfa.attention(q, k, v, causal=True, return_lse=True, policy=policy)
        want_grads = torch.autograd.grad(want, (q, k, v), gout)
        mine = [shard_sequence(x.detach(), rank, world).requires_grad_() for x in (q, k, v)]
        with ring_scope(T):
            out, lse = hf_ahfa.attention(*mine, causal=True, return_lse=True, policy=policy)
            grads = torch.autograd.grad(out, mine, shard_sequence(gout, rank, world))
        errors = {"out": relative_error(out, shard_sequence(want, rank, world)),
                  "lse": relative_error(lse, shard_sequence(want_lse, rank, world, dim=2))}
        errors |= {f"d{n}": relative_error(a, shard_sequence(b, rank, world))
                   for n, a, b in zip("qkv", grads, want_grads)}
        worst = torch.tensor(list(errors.values()), dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        rows.append({"what": "check", "mode": mode, "seq_len": T, **dict(zip(errors, worst.tolist()))})
        say(f"check T={T} {mode}: " + ", ".join(f"{n} {e:.2e}" for n, e in zip(errors, worst.tolist())))
    return rows


def timed_local(fn) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn) -> float:
    """Seconds of ``fn`` run on every rank: the slowest rank's."""
    dist.barrier()
    took = torch.tensor([timed_local(fn)], dtype=torch.float64, device=device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return took.item()


def one_device(fn) -> float:
    """Seconds of ``fn`` run on rank 0 alone, on every rank (NaN where it ran out of memory)."""
    seconds = None
    if rank == 0:
        try:
            seconds = timed_local(fn)
        except torch.OutOfMemoryError:
            seconds = float("nan")
        if cuda:
            torch.cuda.empty_cache()
    result = [seconds]
    dist.broadcast_object_list(result, src=0)
    return result[0]


def attention_rows(T: int) -> list[dict]:
    rows = []
    for mode, fields in MODES.items():
        policy = hf_ahfa.AdaptivePolicy(**fields)
        for train in (False, True):
            (q, k, v), gout = inputs(T, grad=train)
            mine = [shard_sequence(x.detach(), rank, world).requires_grad_(train) for x in (q, k, v)]
            my_gout = shard_sequence(gout, rank, world)

            def step(q, k, v, gout):
                out = hf_ahfa.attention(q, k, v, causal=True, policy=policy)
                if train:
                    torch.autograd.grad(out, (q, k, v), gout)

            def ring():
                with ring_scope(T):
                    step(*mine, my_gout)

            one_device(lambda: step(q, k, v, gout))  # warm-up of both: autotuning, compilation
            ring()
            alone, ringed = [], []
            for _ in range(args.rounds):
                alone.append(one_device(lambda: step(q, k, v, gout)))
                ringed.append(timed(ring))
            rows.append(_speed_row("attention", mode, T, train, alone, ringed))
    return rows


def model_rows(T: int, model) -> list[dict]:
    rows = []
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
    positions = torch.arange(T, device=device)[None]
    for mode, fields in MODES.items():
        hf_ahfa.configure(model, **fields)

        def prefill(ids, positions):
            with torch.no_grad():
                model(input_ids=ids, position_ids=positions, logits_to_keep=1)

        def ring():
            my_ids, my_pos = ids.clone(), positions.clone()
            with context_parallel(mesh, buffers=[my_ids, my_pos], buffer_seq_dims=[1, 1]):
                prefill(my_ids, my_pos)

        one_device(lambda: prefill(ids, positions))  # warm-up of both
        ring()
        alone, ringed = [], []
        for _ in range(args.rounds):
            alone.append(one_device(lambda: prefill(ids, positions)))
            ringed.append(timed(ring))
        rows.append(_speed_row("model prefill", mode, T, False, alone, ringed))
    return rows


def _speed_row(what, mode, T, train, alone, ringed) -> dict:
    one = statistics.median(alone)
    ring = statistics.median(ringed)
    row = {"what": what, "mode": mode, "seq_len": T, "train": train, "ranks": world, "one_device_s": one,
           "ring_s": ring, "speedup": one / ring if one == one else None, "one_device_runs": alone,
           "ring_runs": ringed}
    say(f"{what} T={T} {mode} {'fwd+bwd' if train else 'fwd'}: one device "
        f"{'out of memory' if one != one else f'{one:.3f} s'}, {world} ranks {ring:.3f} s"
        + (f" ({row['speedup']:.2f}x)" if row["speedup"] else ""))
    return row


rows = check(args.check_len) if args.check_len else []
what = set(args.what.split(","))
model = None
if "model" in what:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
                                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=32000,
                                  max_position_embeddings=max(int(t) for t in args.seq_lens.split(",")))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ahfa", dtype=dtype).to(device).eval()
for T in (int(t) for t in args.seq_lens.split(",")):
    if "attention" in what:
        rows += attention_rows(T)
    if model is not None:
        rows += model_rows(T, model)

if rank == 0:
    meta = provenance() | {"ranks": world, "devices": [torch.cuda.get_device_name(i) for i in range(world)]
                           if cuda else ["cpu"] * world, "dtype": str(dtype).replace("torch.", ""),
                           "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "rounds": args.rounds}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{args.name}.json", meta, rows)
    checks = [[r["mode"], r["seq_len"], *(f"{r[n]:.2e}" for n in ("out", "lse", "dq", "dk", "dv"))]
              for r in rows if r["what"] == "check"]
    speeds = [[r["what"], r["mode"], r["seq_len"], "fwd+bwd" if r["train"] else "fwd",
               "out of memory" if r["one_device_s"] != r["one_device_s"] else f"{r['one_device_s']:.3f}",
               f"{r['ring_s']:.3f}", "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}"]
              for r in rows if r["what"] != "check"]
    text = (f"# Context parallelism: {world} ranks against one ({meta['devices'][0]})\n\n"
            f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit'][:12]}, {meta['date']}, "
            f"{meta['dtype']}; attention of {HEADS} query / {KV_HEADS} KV heads, head dim {HEAD_DIM}, causal; "
            f"medians of {args.rounds} alternating rounds (single rounds in the JSON).\n\n"
            "## Ring against the whole sequence on one device (relative max error, worst rank)\n\n"
            + markdown_table(["mode", "tokens", "out", "lse", "dq", "dk", "dv"], checks) + "\n\n## Speed\n\n"
            + markdown_table(["what", "mode", "tokens", "pass", "one device s", f"{world} ranks s", "speed-up"],
                             speeds) + "\n")
    (out / f"{args.name}.md").write_text(text)
    print(text)
dist.destroy_process_group()
