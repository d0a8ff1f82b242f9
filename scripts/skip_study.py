"""Tile-skipping study (issue 12 item 4): on q/k/v recorded from a real model reading real text, how many of the
tiles the adaptive mode keeps the block-sparse kernel would leave out at each ``skip_mass``, and what that costs.

Every global layer of one causal prefill per book is recorded; ahfa's estimator and selection (the default policy,
``hf_ahfa.estimate_layout``) choose the blocks, then ``hf_ahfa.block_sparse.skip_reference`` replays the kernel's
skipping rule tile by tile in the kernel's order (tested equal to the kernel under the interpreter) with the tile
of a launch config (``--tiles``: the H100's head-dim-64 forward entries are 128 x 128 and 128 x 64). Reported per
tile and bound: the share of the kept tiles whose P @ V would be left out, and the output's largest change against
block-sparse attention without skipping (relative to ``max|v|``; the bound is ``2 * skip_mass``). A left-out tile
saves its value load and one of the tile's two matrix products, so at most half of its work: the share bounds
what skipping can buy, before the GPU says what it does buy.

    python scripts/skip_study.py --model PATH --books a.txt b.txt --tokens 4096 --out-dir eval/results \\
        --name skip-study-smollm2 [--gguf-file NAME.gguf]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import torch

import hf_ahfa
from hf_ahfa.block_sparse import layout_band, skip_reference
from hf_ahfa.eval.recorded import add_recording_arguments, record_prefills
from hf_ahfa.eval.speed import visible_blocks
from hf_ahfa.spec import make_call

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
add_recording_arguments(parser, "skip-study")
parser.add_argument("--skip-masses", default="0.0001,0.001,0.01")
parser.add_argument("--tiles", default="128x128,128x64", help="kernel tiles BLOCK_MxBLOCK_N, comma-separated")
args = parser.parse_args()
bounds = [float(x) for x in args.skip_masses.split(",")]
tiles = [tuple(int(n) for n in t.split("x")) for t in args.tiles.split(",")]
policy = hf_ahfa.AdaptivePolicy()
stats = {(t, s): {"skipped": [], "change": []} for t in tiles for s in bounds}
kept = []


def study(module, query, key, value, **kw):
    q, k, v = (x.transpose(1, 2).float() for x in (query, key, value))  # (B, T, H, D), as hf_ahfa takes them
    call = make_call(q, k, v, causal=True, scale=kw.get("scaling"))
    T = q.shape[1]
    lay = hf_ahfa.estimate_layout(q, k, policy, causal=True, scale=call.scale)
    lay = lay.resolve(layout_band(call, lay.block_q, lay.block_k, T, T, q.device), element_masks=False,
                      backward=False)
    kept.append(lay.density(visible_blocks(T, True, q.device, policy.block_size)))
    for tile in tiles:
        exact, _ = skip_reference(q, k, v, lay, call, 0.0, *tile)
        for s in bounds:
            out, share = skip_reference(q, k, v, lay, call, s, *tile)
            stats[tile, s]["skipped"].append(share)
            stats[tile, s]["change"].append(float((out - exact).abs().max() / v.abs().max()))
    print(f"layer {module.layer_idx}: {kept[-1]:.0%} kept, skipped "
          + ", ".join(f"{s:g}: {stats[tiles[0], s]['skipped'][-1]:.3f}" for s in bounds), flush=True)


studied = record_prefills(args, study)
model_name = Path(args.gguf_file or args.model).name

rows = []
for (tile, s), st in stats.items():
    sk = torch.tensor(st["skipped"])
    rows.append(dict(tile=f"{tile[0]}x{tile[1]}", skip_mass=s, skipped_mean=float(sk.mean()),
                     skipped_min=float(sk.min()), skipped_max=float(sk.max()), change_max=max(st["change"])))
lines = [f"# Tile skipping on recorded attention: {model_name}, {len(args.books)} books x {args.tokens} tokens, "
         f"{len(studied)} global layers, default policy (tau {policy.tau}, blocks of {policy.block_size}): "
         f"{sum(kept) / len(kept):.0%} of the causal blocks kept", "",
         "Skipped = share of the kept tiles (of the kernel's tile) whose P @ V the kernel's rule leaves out, mean and "
         "range over (layer, book); change = largest |output - block-sparse output| / max|v| (bound: 2 x skip "
         "mass). PyTorch replay of the rule (`hf_ahfa.block_sparse.skip_reference`), float64, on the CPU.", "",
         "| tile | skip mass | skipped (mean) | skipped (min-max) | largest change / max abs v |", "|---|---|---|---|---|"]
lines += [f"| {r['tile']} | {r['skip_mass']:g} | {r['skipped_mean']:.3f} | {r['skipped_min']:.3f}-{r['skipped_max']:.3f}"
          f" | {r['change_max']:.2e} |" for r in rows]
print("\n".join(lines))
if args.out_dir:
    meta = dict(model=args.model, gguf_file=args.gguf_file, books=[Path(b).name for b in args.books],
                tokens=args.tokens, policy=dataclasses.asdict(policy), kept_share_mean=sum(kept) / len(kept),
                torch=torch.__version__, machine=platform.machine(), layers_studied=sorted(studied))
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out_dir / (args.name + '.json')}, {args.out_dir / (args.name + '.md')}")
