"""ahfa-eval needle: passkey retrieval from long contexts, ahfa (e.g. adaptive) against a baseline, in one run.

For each context length C of --context-lengths, depth p of --depths and trial t, the prompt is C - --new-tokens
tokens (prompt and answer together fill C positions):
text of the --data-files books (taken in order, from a different point per trial) with one sentence
"The pass key is N. Remember it. N is the pass key." inserted at the token closest to p * (filler length),
and the question "What is the pass key? The pass key is" at the end. N is a random 5-digit number (seeded by
C, p and t, the same for every implementation). Each implementation generates --new-tokens tokens greedily;
it is correct when N appears in them. Reported: accuracy per implementation and context length, per depth,
and how often the two agree. The finished items are kept in <out-dir>/<name>.jsonl: a rerun resumes.

    ahfa-eval needle --model PATH --data-files book1.txt book2.txt --context-lengths 8192,16384,32768 \\
        --mode adaptive --tau 0.95,0.99 --baseline ahfa
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import torch
from tqdm import tqdm

import hf_ahfa
from hf_ahfa.eval.perplexity import (
    add_adaptive_comparison_arguments, add_model_arguments, checked_comparison, load_compared_model,
)
from hf_ahfa.eval.perplexity_data import document_start_token, joined_books
from hf_ahfa.eval.perplexity_protocols import max_positions, switch_attention
from hf_ahfa.eval.report import markdown_table, provenance, write_atomic, write_json
from hf_ahfa.eval.runs import ResultStore, process_device, resolve_dtype
from hf_ahfa.eval.usage import DEFAULT_OUT, UsageError, add_command, float_list, int_list

QUESTION = "\nWhat is the pass key? The pass key is"


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "needle", "passkey retrieval at depths of long contexts, ahfa vs a baseline", __doc__)
    add_model_arguments(p)
    add_adaptive_comparison_arguments(p)
    g = p.add_argument_group("task")
    g.add_argument("--data-files", nargs="+", type=Path, required=True, help="plain-text books the filler comes from")
    g.add_argument("--context-lengths", type=int_list, default=[8192, 16384, 32768],
                   help="prompt lengths in tokens, comma-separated")
    g.add_argument("--depths", type=float_list, default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="where the pass key sits, as fractions of the filler, comma-separated")
    g.add_argument("--trials", type=int, default=2, help="pass keys (and filler start points) per length and depth")
    g.add_argument("--new-tokens", type=int, default=8, help="tokens generated for the answer")
    g.add_argument("--seed", type=int, default=0, help="seed of the pass keys and filler start points")
    g.add_argument("--window-start", choices=["auto", "bos", "none"], default="auto",
                   help="token each prompt begins with: auto = BOS if the tokenizer adds it, bos = always BOS "
                        "(GGUF tokenizers that lost the setting, e.g. Gemma-3's)")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="folder of the result files")
    g.add_argument("--name", default="needle", help="file stem of the results")
    p.set_defaults(run=run)


def build_prompt(filler: list[int], needle: list[int], question: list[int], start: list[int], length: int,
                 depth: float) -> tuple[list[int], int]:
    """``start + filler' + question`` of ``length`` tokens, ``filler'`` being the first tokens of ``filler``
    with ``needle`` inserted at ``round(depth * len(filler'))``; returns the prompt and where the needle starts."""
    room = length - len(start) - len(needle) - len(question)
    if room < 1 or len(filler) < room:
        raise UsageError(f"context length {length}: {len(filler)} filler tokens, {room} needed")
    body = filler[:room]
    at = round(depth * room)
    return start + body[:at] + needle + body[at:] + question, len(start) + at


def _draw(seed: int, length: int, depth: float, trial: int, n_filler: int) -> tuple[int, int]:
    """The pass key (5 digits) and the filler's start token of one item: the same for every implementation."""
    rng = random.Random(f"{seed}/{length}/{depth}/{trial}")
    return rng.randrange(10000, 100000), rng.randrange(max(1, n_filler - length))


def _check(args, max_pos) -> None:
    if not args.context_lengths or min(args.context_lengths) < 64:
        raise UsageError(f"--context-lengths must be at least 64 tokens each, got {args.context_lengths}")
    if max_pos is not None and max(args.context_lengths) > max_pos:
        raise UsageError(f"--context-lengths {args.context_lengths}: the model takes at most {max_pos} positions")
    if not args.depths or not all(0 <= d <= 1 for d in args.depths):
        raise UsageError(f"--depths must be fractions in [0, 1], got {args.depths}")
    if args.new_tokens >= min(args.context_lengths):
        raise UsageError(f"--new-tokens {args.new_tokens} leaves no room for a prompt in --context-lengths "
                         f"{args.context_lengths}")
    for option in ("trials", "new_tokens"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    for path in args.data_files:
        if not path.is_file():
            raise UsageError(f"--data-files: no such file {path}")


def run(args) -> dict[str, Path]:
    """Ask every (length, depth, trial) of every variant; write ``<name>.jsonl/.json/.md/.png``."""
    args.device = process_device(args.device)
    tests, base = checked_comparison(args)
    dtype = resolve_dtype(args.dtype, args.device)
    model, tokenizer = load_compared_model(args, dtype)
    _check(args, max_positions(model))
    text = joined_books(args.data_files)
    filler_all = tokenizer(text, add_special_tokens=False).input_ids
    bos = document_start_token(tokenizer, args.window_start)
    start = [] if bos is None else [bos]
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    config = {"model": os.path.expanduser(args.model), "gguf_file": args.gguf_file, "device": args.device,
              "dtype": str(dtype).removeprefix("torch."), "variants": [v.label for v in (*tests, base)],
              "data": [str(p) for p in args.data_files], "context_lengths": args.context_lengths,
              "depths": args.depths, "trials": args.trials, "new_tokens": args.new_tokens, "seed": args.seed,
              "prompt_start_token": bos}
    paths = {ext: Path(args.out_dir) / f"{args.name}.{ext}" for ext in ("jsonl", "json", "md", "png")}
    store = ResultStore(paths["jsonl"], config)
    items = [(c, d, t) for c in args.context_lengths for d in args.depths for t in range(args.trials)]
    with torch.inference_mode():
        for index, (c, d, t) in enumerate(tqdm(items, desc="lengths x depths x trials")):
            if not store.mine(index):
                continue
            key_number, offset = _draw(args.seed, c, d, t, len(filler_all))
            needle = tokenizer(f" The pass key is {key_number}. Remember it. {key_number} is the pass key. ",
                               add_special_tokens=False).input_ids
            ids, at = build_prompt(filler_all[offset:], needle, question, start, c - args.new_tokens, d)
            for v in (*tests, base):
                k = f"{v.label}/ctx{c}/depth{d:g}/trial{t}"
                if k in store:
                    continue
                answer = _answer(model, tokenizer, v, ids, args)
                # digits may come back apart ("1 2 3 4 5") where the tokenizer holds one per token
                store.add(k, impl=v.label, ctx=c, depth=d, trial=t, pass_key=key_number, needle_at=at,
                          answer=answer, correct=str(key_number) in "".join(answer.split()))
    if not store.gather():
        return {}
    return _report(store.rows(), [v.label for v in tests], base.label, config, paths)


def _answer(model, tokenizer, variant, ids, args) -> str:
    switch_attention(model, variant.impl)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with hf_ahfa.override(**dict(variant.policy)) if variant.policy else contextlib.nullcontext():
        out = model.generate(torch.tensor([ids], device=args.device), max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def _accuracy(rows) -> float:
    return sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")


def _report(rows, tests, base, config, paths) -> dict[str, Path]:
    lengths, depths = config["context_lengths"], config["depths"]
    impls = [*tests, base]
    by = {(r["impl"], r["ctx"], r["depth"], r["trial"]): r for r in rows}
    table = []
    for c in lengths:
        for impl in impls:
            cell = [r for r in rows if r["impl"] == impl and r["ctx"] == c]
            twins = [(r, by.get((base, c, r["depth"], r["trial"]))) for r in cell] if impl != base else []
            agree = [r["correct"] == b["correct"] for r, b in twins if b is not None]
            table.append(dict(impl=impl, ctx=c, accuracy=_accuracy(cell), n=len(cell),
                              per_depth={f"{d:g}": _accuracy([r for r in cell if r["depth"] == d]) for d in depths},
                              agree_with_baseline=sum(agree) / len(agree) if agree else None))
    summary = {"by_context": table, "baseline": base}
    write_json(paths["json"], provenance(), rows, config=config, summary=summary)
    md = [f"# Pass-key retrieval: {', '.join(tests)} against {base}", "",
          f"Model {config['model']}, {config['dtype']} on {config['device']}; {config['trials']} pass keys per "
          "length and depth; correct = the key appears in the greedy answer.", "",
          markdown_table(["context", "implementation", "accuracy", "answers", *[f"depth {d:g}" for d in depths],
                          f"same outcome as {base}"],
                         [[x["ctx"], x["impl"], f"{x['accuracy']:.2f}", x["n"],
                           *[f"{x['per_depth'][f'{d:g}']:.2f}" for d in depths],
                           "" if x["agree_with_baseline"] is None else f"{x['agree_with_baseline']:.2f}"]
                          for x in table])]
    write_atomic(paths["md"], "\n".join(md) + "\n")
    _plot(table, impls, lengths, depths, paths["png"])
    print("\n".join(md))
    return paths


def _plot(table, impls, lengths, depths, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(impls), figsize=(3.2 * len(impls) + 1, 3), squeeze=False)
    for ax, impl in zip(axes[0], impls):
        grid = [[next(x for x in table if x["impl"] == impl and x["ctx"] == c)["per_depth"][f"{d:g}"] for c in lengths]
                for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(c) for c in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_ylabel("depth")
        ax.set_title(impl, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)
