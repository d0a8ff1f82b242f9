"""``ahfa-eval``: measure ``ahfa`` against baseline attention implementations; results under eval/results/.

Subcommands: ``speed`` (kernel level), ``perplexity`` (WikiText-style and long-context), ``glue``
(fine-tuning). Each writes JSON (config, versions, GPU, commit, per-item numbers) and a Markdown
summary; long loops show progress and resume after an interruption.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("eval/results")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _variants(args) -> dict[str, tuple[str, dict]]:
    """ahfa's variants to measure: exact, plus one per ``--tau`` in adaptive/auto mode."""
    from hf_ahfa.eval.runs import adaptive_variants

    out = {"ahfa": ("ahfa", {"mode": "exact"})}
    if args.mode != "exact":  # invalid values fail here, before the model loads
        out.update({label: ("ahfa", fields) for label, fields in adaptive_variants(args.mode, args.tau).items()})
    return out


def _text_tokens(args, tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of ``--text`` (a document-start token first, as ``perplexity`` does)."""
    from hf_ahfa.eval.perplexity import document_start_token

    path = Path(args.text)
    if not path.is_file():
        raise SystemExit(f"ahfa-eval speed: --text {args.text}: no such file")
    ids = tokenizer(path.read_text(), verbose=False)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"ahfa-eval speed: --text holds {len(ids)} tokens, --seq-lens needs {n}")
    start = document_start_token(tokenizer, args.window_start)
    return ([start] if start is not None and ids[0] != start else []) + ids[:n]


def _model_speed(args) -> None:
    from hf_ahfa.eval.model_speed import measure, write_model_speed_report
    from hf_ahfa.eval.runs import load_causal_lm, resolve_dtype

    variants = _variants(args)
    dtype = resolve_dtype(args.dtype, args.device)
    model, tokenizer = load_causal_lm(args.model, "ahfa", dtype, args.device, args.gguf_file)
    tokens = _text_tokens(args, tokenizer, max(args.seq_lens)) if args.text else None
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    config = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "baseline": args.baseline,
              "decode_tokens": args.decode_tokens, "text": args.text, "variants": variants}
    if args.attention:
        return _attention_speed(args, model, tokens, variants, config, max_pos)
    too_long = [L for L in args.seq_lens if max_pos and L + args.decode_tokens > max_pos]
    if too_long:
        raise SystemExit(f"ahfa-eval speed: --seq-lens {too_long} plus --decode-tokens exceed the model's "
                         f"max_position_embeddings ({max_pos})")
    rows = measure(model, [*variants, args.baseline], args.seq_lens, args.decode_tokens, train=not args.no_train,
                   policies=variants, tokens=tokens)
    print(write_model_speed_report(rows, config, args.out_dir, args.name)["md"].read_text())


def _attention_speed(args, model, tokens, variants, config, max_pos) -> None:
    import torch

    import hf_ahfa
    from hf_ahfa.eval.attention_speed import SDPA, capture_calls, measure, report_lines
    from hf_ahfa.eval.report import provenance, write_atomic, write_json

    if tokens is None:
        raise SystemExit("ahfa-eval speed --attention: pass --text (a long real text): sparsity depends on it")
    policies = {label: None if f["mode"] == "exact" else hf_ahfa.AdaptivePolicy(**f) for label, (_, f) in variants.items()}
    providers = ["sdpa", *[p for p in args.providers if p in SDPA and p != "sdpa"]]
    rows = []
    for L in args.seq_lens:
        ids = torch.tensor(tokens[:L], device=args.device)[None]
        calls = capture_calls(model, ids)
        rows += measure(calls, policies, providers)
        del calls
        torch.cuda.empty_cache()
    meta = provenance()
    paths = {ext: Path(args.out_dir) / f"{args.name}.{ext}" for ext in ("json", "md")}
    write_json(paths["json"], meta, rows, config=config)
    notes = [f"lengths above the model's max_position_embeddings ({max_pos}) run beyond its trained positions"] \
        if max_pos and max(args.seq_lens) > max_pos else []
    md = [f"# Attention time of a prefill: {args.model} on {meta['gpu']}", "",
          f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit'][:12]}, {meta['date']}, "
          f"{config['dtype']}, batch 1, text {args.text}. Every attention call of one forward, replayed per provider "
          "(median of 5 after a warm-up). Adaptive rows include the estimator and block selection; kept blocks = "
          "share of visible 128x128 blocks computed in the layers that ran block-sparse.", "",
          *report_lines(rows), *[f"- {n}" for n in notes]]
    write_atomic(paths["md"], "\n".join(md) + "\n")
    print(paths["md"].read_text())


def _speed(args) -> None:
    import torch

    from hf_ahfa.eval.speed import PROVIDERS, known_provider, run_kernel_sweep
    from hf_ahfa.eval.speed_report import write_speed_report

    if args.model:
        return _model_speed(args)
    if not torch.cuda.is_available():
        raise SystemExit("ahfa-eval speed: kernel benchmarks need a CUDA GPU")
    unknown = {p for p in args.providers if not known_provider(p)}
    if unknown:
        raise SystemExit(f"ahfa-eval speed: unknown --providers {sorted(unknown)}; choose from {PROVIDERS}")
    rows = run_kernel_sweep(
        args.seq_lens, args.head_dims, args.modes, args.providers, [c == "causal" for c in args.masks],
        args.decode_lens, tokens=args.tokens, heads=args.heads,
    )
    paths = write_speed_report(rows, args.out_dir, args.name)
    print(paths["md"].read_text())


def _add_speed(sub) -> None:
    sp = sub.add_parser("speed", help="kernel-level speed of ahfa vs SDPA backends, FlexAttention, flash-attn")
    sp.add_argument("--seq-lens", type=_ints, default=[1024, 2048, 4096, 8192, 16384, 32768])
    sp.add_argument("--head-dims", type=_ints, default=[64, 128])
    sp.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    sp.add_argument("--masks", nargs="+", default=["causal", "full"], choices=["causal", "full"])
    sp.add_argument("--providers", nargs="+", default=["ahfa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex"])
    sp.add_argument("--decode-lens", type=_ints, default=[8192, 32768, 131072])
    sp.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens // seq_len)")
    sp.add_argument("--heads", type=int, default=32)
    sp.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    sp.add_argument("--name", default="speed", help="file stem of the JSON/Markdown/PNG results")
    whole = sp.add_argument_group("whole-model mode (with --model): prefill, decode and training step")
    whole.add_argument("--model", help="hub name or local folder; switches to whole-model measurements")
    whole.add_argument("--gguf-file", help="GGUF file inside --model")
    whole.add_argument("--baseline", default="sdpa", help="implementation to compare with (sdpa, eager, ...)")
    whole.add_argument("--decode-tokens", type=int, default=64)
    whole.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    whole.add_argument("--device", default="cuda" if _cuda() else "cpu")
    whole.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    whole.add_argument("--text", help="a long text file whose tokens the prefills use (default: random tokens)")
    whole.add_argument("--window-start", choices=["auto", "bos", "none"], default="auto",
                       help="token the text starts with: auto = BOS if the tokenizer adds it, bos = always BOS")
    whole.add_argument("--attention", action="store_true",
                       help="time the attention of a prefill alone: every attention call of one forward over "
                            "--text, replayed per provider (ahfa variants, sdpa, and the --providers sdpa-cudnn / "
                            "sdpa-flash)")
    whole.add_argument("--mode", default="exact", choices=["exact", "adaptive", "auto"],
                       help="also measure ahfa in this mode (one variant per --tau)")
    whole.add_argument("--tau", type=_floats, help="adaptive/auto: mass target(s), comma-separated")
    sp.set_defaults(func=_speed)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    from hf_ahfa.eval import glue, perplexity

    parser = argparse.ArgumentParser(prog="ahfa-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_speed(sub)
    perplexity.add_parser(sub)
    glue.add_parser(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
