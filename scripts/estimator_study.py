"""Estimator study (issue 12 item 2): how much of the true attention mass each block estimator's selection keeps,
on q/k recorded from a real model reading real text (causal prefill, every layer and query head).

Estimators, each giving a mass per (query block, key block) that the library's own top-p selection
(``hf_ahfa.select.select_blocks``, no dense fallback) turns into kept blocks at each tau:

* ``rows-union``: ahfa's estimator and selection (``hf_ahfa.estimate.estimate_row_mass``: every ``stride``-th
  query row; ``hf_ahfa.select.select_blocks``: each sampled row's own top-p blocks, their union per query block);
* ``rows``: the same sampled rows averaged per query block, one top-p per block (ahfa's selection before v2);
* ``antidiagonal``: XAttention-style, the scores on antidiagonals ``stride`` apart inside each block
  (queries ``i = r mod S`` against keys ``j = S-1-r mod S``), softmax per sampled row, summed per block;
* ``vertical-slash``: MInference/FlexPrefill-style, the last query block's attention split into a per-key
  (vertical) and a per-offset (slash) profile, spread back over every block;
* ``rows-gqa``: ``rows`` averaged over the query heads that share a key/value head, one selection per group
  (GQA-aware: one layout per KV head, fewer K/V loads);
* ``rows-union-gqa``: ``rows-union``'s selection of each query head, their union over the heads that share a
  key/value head (one layout per KV head at no loss of captured mass: what it costs is the kept share);
* ``rows-union-guardG``: ``rows-union`` with a fallback where it looks unsure: a query block one of whose
  sampled rows, left out, would keep less than ``1 - G * (1 - tau)`` of its mass in the blocks the other rows
  and the anchors chose keeps every visible block (``--guards`` lists the G; tried, not adopted);
* ``oracle``: the true block mass itself (the fewest blocks that reach tau: the floor of the kept share).

Layers with a sliding window are skipped (the adaptive mode leaves their band as it is): for Gemma-3 the study
covers its global layers only.

Reported per method and tau: kept share of the causal blocks, captured true mass per (head, query block): mean
and the worst 1% and 5%; per (head, query row): the worst 1% and 0.1% (what one token's output loses); and the
estimator's dot products as a share of the full causal ``Q K^T``.

    python scripts/estimator_study.py --model PATH --books a.txt b.txt --tokens 4096 --out-dir eval/results \\
        --name estimator-study-smollm2 [--gguf-file NAME.gguf]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import hf_ahfa
from hf_ahfa.eval.recorded import add_recording_arguments, record_prefills
from hf_ahfa.eval.runs import load_causal_lm
from hf_ahfa.estimate import estimate_row_mass
from hf_ahfa.select import anchor_blocks_of_shape, band_of_shape, select_blocks
from hf_ahfa.spec import make_call

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
add_recording_arguments(parser, "estimator-study")
parser.add_argument("--block-size", type=int, default=64)
parser.add_argument("--stride", type=int, default=16, help="rows / antidiagonal stride of the estimators")
parser.add_argument("--taus", default="0.9,0.95,0.99")
parser.add_argument("--guards", default="", help="comma-separated G of the rows-union-guardG methods")
args = parser.parse_args()
taus = [float(t) for t in args.taus.split(",")]
bs, S, T = args.block_size, args.stride, args.tokens
if T % bs:
    raise SystemExit(f"--tokens {T} must be a multiple of --block-size {bs}")
GUARDS = {f"rows-union-guard{g}": float(g) for g in args.guards.split(",") if g}
METHODS = ("oracle", "rows-union", "rows-union-gqa", *GUARDS, "rows", "rows-gqa", "antidiagonal", "vertical-slash")
policy = hf_ahfa.AdaptivePolicy(mode="adaptive", block_size=bs, stride=S, density_limit=1.0)
band = band_of_shape(T, T, bs, bs, True, None, "cpu")[0]  # (1, 1, NQ, NK) blocks the causal band touches
anchors = anchor_blocks_of_shape(T, T, policy, True, "cpu")
nb = -(-T // bs)


def block_sum(p: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per head, the sum of ``p (H, R, C)`` over (query block of ``rows``, key block of ``cols``): ``(H, NQ, NK)``."""
    H = p.shape[0]
    out = torch.zeros(H, nb * nb, dtype=torch.float64)
    idx = (rows[:, None] // bs) * nb + cols[None, :] // bs
    out.index_add_(1, idx.flatten(), p.reshape(H, -1).double())
    return out.view(H, nb, nb)


def normalise(m: torch.Tensor) -> torch.Tensor:
    return m / m.sum(-1, keepdim=True).clamp_min(1e-30)


def masses(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``q (H, T, D)``, ``k (H, T, D)`` (GQA already expanded): the true and estimated block masses (the
    ``rows-union`` entry: per sampled row ``(H, NR, NK)``), and the true mass per (head, query row, key block)."""
    pos = torch.arange(T)
    out = {}
    s = (q @ k.transpose(1, 2)) * scale
    p = torch.softmax(s.masked_fill(pos[None, :] > pos[:, None], float("-inf")), -1)
    out["oracle"] = normalise(block_sum(p, pos, pos))
    per_row = p.view(p.shape[0], T, nb, bs).sum(-1).double()  # (H, T, NK)
    true = out["oracle"]
    del s, p
    # ahfa's estimator, through the library ((B, T, H, D) layout)
    qt, kt = q.transpose(0, 1)[None], k.transpose(0, 1)[None]
    est = estimate_row_mass(qt, kt, make_call(qt, kt, kt, causal=True, scale=scale), policy)[0]
    out["rows-union"] = est.double()  # per sampled row (H, NR, NK)
    out["rows"] = normalise(out["rows-union"].view(est.shape[0], nb, bs // S, -1).mean(2))
    # antidiagonals S apart: query rows r mod S against key columns S-1-r mod S
    acc = torch.zeros_like(true)
    for r in range(S):
        qi, kj = pos[r::S], pos[S - 1 - r::S]
        s = (q[:, r::S] @ k[:, S - 1 - r::S].transpose(1, 2)) * scale
        p = torch.softmax(s.masked_fill(kj[None, :] > qi[:, None], float("-inf")), -1).nan_to_num(0.0)
        acc += block_sum(p, qi, kj)
    out["antidiagonal"] = normalise(acc)
    # the last query block's attention as a vertical (per key) and a slash (per offset) profile
    last = pos[-bs:]
    s = (q[:, -bs:] @ k.transpose(1, 2)) * scale
    p = torch.softmax(s.masked_fill(pos[None, :] > last[:, None], float("-inf")), -1).double()  # (H, bs, T)
    vertical = p.mean(1)  # (H, T)
    slash = torch.zeros(q.shape[0], T, dtype=torch.float64).index_add_(
        1, (last[:, None] - pos[None, :]).clamp_min(0).flatten(), p.reshape(q.shape[0], -1)) / bs  # by offset
    vb = vertical.view(-1, nb, bs).sum(-1)  # (H, NK)
    est = vb[:, None, :].expand(-1, nb, -1).clone()
    for d in range(nb):  # block diagonal d holds offsets (d-1)*bs+1 .. (d+1)*bs-1, on average d*bs
        lo, hi = max(0, (d - 1) * bs + 1), min(T, (d + 1) * bs)
        share = slash[:, lo:hi].sum(-1) / 2  # each offset spans two neighbouring block diagonals
        idx = torch.arange(d, nb)
        est[:, idx, idx - d] += share[:, None]
    out["vertical-slash"] = normalise(est.masked_fill(~band[0, 0], 0.0))
    return out, per_row


def guarded(keep: torch.Tensor, est: torch.Tensor, tau: float, guard: float) -> torch.Tensor:
    """``keep (1, H, NQ, NK)`` of ``rows-union`` with every visible block of the query blocks where a sampled row
    of ``est (H, NR, NK)``, left out, keeps less than ``guard`` of its mass in the others' blocks and the anchors."""
    H, NR, NK = est.shape
    per = bs // S
    rows, _ = select_blocks(est[None].float(), band.repeat_interleave(per, 2)[:, :, :NR],
                            torch.zeros_like(anchors).repeat_interleave(per, 2)[:, :, :NR], tau, 1.0)  # each row's own
    pad = (0, 0, 0, nb * per - NR)
    rows = torch.nn.functional.pad(rows[0].long(), pad).view(H, nb, per, NK)
    m = torch.nn.functional.pad(normalise(est), pad).view(H, nb, per, NK)
    others = (rows.sum(2, keepdim=True) - rows > 0) | anchors[0, 0, :, None]
    left_out = (m * others).sum(-1) + (m.sum(-1) == 0)  # rows without mass (padding) are sure
    unsure = (left_out < guard).any(-1)  # (H, NQ)
    return torch.where(unsure[None, ..., None], band, keep)


def cost(method: str) -> float:
    """Dot products of the estimator over those of the full causal Q K^T."""
    full = T * (T + 1) / 2
    sampled = full / S / full
    return {"oracle": 1.0, "rows": sampled, "rows-union": sampled, "rows-union-gqa": sampled, "rows-gqa": sampled,
            "antidiagonal": sampled,
            "vertical-slash": bs * T / full, **{g: sampled for g in GUARDS}}[method]


model, tokenizer = load_causal_lm(args.model, "sdpa", torch.float32, "cpu", args.gguf_file)
captured = {(m, t): [] for m in METHODS for t in taus}
row_captured = {(m, t): [] for m in METHODS for t in taus}
kept = {(m, t): [0, 0] for m in METHODS for t in taus}


def study(module, query, key, value, **kw):
    B, H, _, D = query.shape
    k = key.repeat_interleave(H // key.shape[1], 1)
    m, per_row = masses(query[0].float(), k[0].float(), kw.get("scaling") or D**-0.5)
    group = H // key.shape[1]
    m["rows-gqa"] = m["rows"].unflatten(0, (-1, group)).mean(1).repeat_interleave(group, 0)
    m.update({g: m["rows-union"] for g in ("rows-union-gqa", *GUARDS)})
    true = m["oracle"][None]
    for method, est in m.items():
        for tau in taus:
            union = method.startswith("rows-union")
            per_block = bs // S if union else 1  # sampled rows per query block, or one estimate
            keep, _ = select_blocks(est[None].float(), band, anchors, tau, 1.0, per_block)
            if method in GUARDS:
                keep = guarded(keep, est, tau, 1 - GUARDS[method] * (1 - tau))
            if method == "rows-union-gqa":  # (1, H, NQ, NK): each group's union, for each of its heads
                keep = keep.unflatten(1, (-1, group)).any(2, keepdim=True).expand(-1, -1, group, -1, -1).flatten(1, 2)
            row_captured[method, tau].append((per_row * keep[0].repeat_interleave(bs, 1)).sum(-1).flatten().float())
            got = (true * keep).sum(-1)[0][band[0, 0].any(-1)[None].expand(H, -1)]  # per (head, query block)
            captured[method, tau].append(got.float())
            kept[method, tau][0] += int(keep.sum())
            kept[method, tau][1] += int(band.sum()) * H


studied = record_prefills(args, study, model, tokenizer)  # layers with global attention

rows = []
for method in METHODS:
    for tau in taus:
        c = torch.cat(captured[method, tau])
        rows.append(dict(method=method, tau=tau, kept_share=kept[method, tau][0] / kept[method, tau][1],
                         captured_mean=float(c.mean()), captured_worst_5pct=float(c.quantile(0.05)),
                         captured_worst_1pct=float(c.quantile(0.01)), estimator_cost=cost(method)))
        r = torch.cat(row_captured[method, tau])
        r = r[torch.randperm(len(r))[:4_000_000]]  # torch.quantile takes at most 2^24 values
        rows[-1].update(row_worst_1pct=float(r.quantile(0.01)), row_worst_01pct=float(r.quantile(0.001)))
model_name = Path(args.gguf_file or args.model).name
lines = [f"# Estimator study: {model_name}, {len(args.books)} books x {T} tokens, blocks of {bs}, "
         f"{len(studied)} global layers of {model.config.get_text_config().num_hidden_layers}",
         "", "Captured = true attention mass of the kept blocks per (layer, head, query block); kept share of the "
         "causal blocks; row: the same per (head, query row); estimator cost = its dot products / those of the full "
         "causal QK^T. Selection: hf_ahfa's `select_blocks` (anchors kept, no dense fallback): top-p per sampled row "
         "and their union per query block (rows-union, ahfa's), or top-p of one estimate per query block (the "
         "others).", "",
         "| method | tau | kept share | captured mean | worst 5% | worst 1% | row: worst 1% | row: worst 0.1% "
         "| estimator cost |", "|---|---|---|---|---|---|---|---|---|"]
lines += [f"| {r['method']} | {r['tau']} | {r['kept_share']:.3f} | {r['captured_mean']:.4f} | "
          f"{r['captured_worst_5pct']:.4f} | {r['captured_worst_1pct']:.4f} | {r['row_worst_1pct']:.4f} | "
          f"{r['row_worst_01pct']:.4f} | {r['estimator_cost']:.3f} |" for r in rows]
print("\n".join(lines))
if args.out_dir:
    meta = dict(model=args.model, gguf_file=args.gguf_file, books=[Path(b).name for b in args.books], tokens=T,
                block_size=bs, stride=S, torch=torch.__version__, machine=platform.machine(),
                layers=model.config.get_text_config().num_hidden_layers, layers_studied=sorted(studied))
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out_dir / (args.name + '.json')}, {args.out_dir / (args.name + '.md')}")
