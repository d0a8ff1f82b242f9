"""ahfa-eval calibrate: per-layer adaptive settings within a perplexity budget on sample text (hf_ahfa.calibrate).

The samples are --samples windows of --context-length tokens taken at evenly spaced points of the
--data-files books. Each layer gets the lowest of --taus whose perplexity change alone stays within its
share of --budget (a layer none fits stays exact); then all layers together are checked and the costliest
raised until the whole model is within the budget. Written: the per-layer settings (JSON, and a Markdown
table of each layer's change per tau); with --save-to, the model and tokenizer with the settings in
config.ahfa (save_pretrained). Check them on held-out text with `ahfa-eval perplexity`.

    ahfa-eval calibrate --model PATH --data-files book1.txt --context-length 16384 --budget 0.005 \\
        --save-to ./model-calibrated
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import hf_ahfa
from hf_ahfa.eval.perplexity import add_model_arguments
from hf_ahfa.eval.perplexity_data import joined_books
from hf_ahfa.eval.report import markdown_table, provenance, write_atomic, write_json
from hf_ahfa.eval.runs import load_causal_lm, process_device, resolve_dtype, save_causal_lm
from hf_ahfa.eval.usage import DEFAULT_OUT, UsageError, add_command, float_list


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "calibrate", "per-layer adaptive settings within a perplexity budget", __doc__)
    add_model_arguments(p)
    g = p.add_argument_group("calibration")
    g.add_argument("--data-files", nargs="+", type=Path, required=True,
                   help="plain-text books the samples come from")
    g.add_argument("--context-length", type=int, default=4096, help="tokens per sample (the lengths you will run)")
    g.add_argument("--samples", type=int, default=4, help="sample windows, evenly spaced over the books")
    g.add_argument("--budget", type=float, default=0.005,
                   help="allowed perplexity change of the whole model, either way (0.005: 0.5%%)")
    g.add_argument("--taus", type=float_list, default=[0.9, 0.95, 0.98, 0.99],
                   help="candidate taus, comma-separated")
    g.add_argument("--mode", default="auto", choices=["auto", "adaptive"],
                   help="mode written for the calibrated layers (auto: block-sparse only where it pays)")
    g.add_argument("--block-size", type=int, help="block edge in tokens (default: the policy's)")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="folder of the result files")
    g.add_argument("--name", default="calibrate", help="file stem of the results")
    g.add_argument("--save-to", type=Path, help="save the model and tokenizer with the settings here")
    p.set_defaults(run=run)


def sample_windows(tokens: list[int], length: int, count: int) -> list[torch.Tensor]:
    """``count`` windows of ``length`` tokens at evenly spaced starts of ``tokens``, as ``(1, length)`` tensors."""
    if len(tokens) < length:
        raise UsageError(f"--data-files hold {len(tokens)} tokens, fewer than --context-length {length}")
    last = len(tokens) - length
    starts = sorted({round(i * last / max(count - 1, 1)) for i in range(count)})
    return [torch.tensor(tokens[s:s + length])[None] for s in starts]


def run(args) -> dict[str, Path]:
    """Calibrate, write ``<name>.json/.md``, and save the model where asked."""
    for path in args.data_files:
        if not path.is_file():
            raise UsageError(f"--data-files: no such file {path}")
    if args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    args.device = process_device(args.device)
    dtype = resolve_dtype(args.dtype, args.device)
    model, tokenizer = load_causal_lm(args.model, "ahfa", dtype, args.device, args.gguf_file)
    if args.block_size is not None:
        try:
            hf_ahfa.configure(model, block_size=args.block_size)
        except ValueError as err:
            raise UsageError(f"--block-size: {err}") from err
    text = joined_books(args.data_files)
    samples = sample_windows(tokenizer(text, add_special_tokens=False).input_ids, args.context_length, args.samples)
    try:
        result = hf_ahfa.calibrate(model, samples, budget=args.budget, taus=args.taus, mode=args.mode)
    except ValueError as err:
        raise UsageError(str(err)) from err
    config = {"model": os.path.expanduser(args.model), "gguf_file": args.gguf_file, "device": args.device,
              "dtype": str(dtype).removeprefix("torch."), "data": [str(p) for p in args.data_files],
              "context_length": args.context_length, "samples": len(samples), "budget": args.budget,
              "taus": args.taus, "mode": args.mode, "policy": hf_ahfa.policy.policy_of(model.config).to_dict()}
    rows = [{"layer": i, "tau": tau, "change": change} for i, by_tau in result.alone.items()
            for tau, change in by_tau.items()]
    paths = {ext: Path(args.out_dir) / f"{args.name}.{ext}" for ext in ("json", "md")}
    meta = provenance()
    write_json(paths["json"], meta, rows, config=config, layers=[list(e) for e in result.layers],
               change=result.change, base_nll=result.base_nll)
    chosen = {i: tau for i, _, tau in result.layers}
    lines = [[i, " ".join(f"{tau:g}: {change:+.3%}" for tau, change in by_tau.items()), chosen.get(i, "exact")]
             for i, by_tau in result.alone.items()]
    md = [f"# Calibration: {config['model']} on {meta['gpu'] or meta['cpu']}", "",
          f"{len(samples)} samples of {args.context_length} tokens, budget {args.budget:.2%}, mode {args.mode}: "
          f"{len(result.layers)} of {len(result.alone)} layers block-sparse, whole-model perplexity change "
          f"{result.change:+.3%} on the samples (exact perplexity {torch.tensor(result.base_nll).exp():.4f}). The "
          f"entries hold for contexts of up to {config['policy']['layers_max_length']} tokens (`layers_max_length`); "
          f"longer ones run those layers as the rest of the policy (mode {config['policy']['mode']}).", "",
          markdown_table(["layer", "perplexity change alone, per tau", "chosen tau"], lines)]
    write_atomic(paths["md"], "\n".join(md) + "\n")
    if args.save_to:
        save_causal_lm(model, tokenizer, args.save_to)
        paths["model"] = args.save_to
    return paths
