"""ahfa-eval speed: the speed of ahfa against other attention implementations, in three set-ups.

* Kernels (default; needs a CUDA GPU): ahfa against SDPA's backends, FlexAttention and flash-attn on
  random inputs, prefill forward and forward+backward, causal and full, plus a decode sweep.
* A whole model (--model): prefill time and peak memory, decode tokens/s and a training step, ahfa
  against --baseline on the same model, beside the complexity analyzer's predictions.
* The attention of a real prefill (--model with --attention and --text): every attention call of one
  forward replayed per provider.

Each writes <name>.json and <name>.md (and a PNG for the first two) under --out-dir.

    ahfa-eval speed --providers ahfa sdpa-cudnn sdpa-flash --name speed-h100
    ahfa-eval speed --model PATH --seq-lens 1024,2048,4096
    ahfa-eval speed --model PATH --text book.txt --attention --mode adaptive --tau 0.95,0.99
"""

from __future__ import annotations

from pathlib import Path

from hf_ahfa.eval.usage import DEFAULT_OUT, UsageError, add_command, float_list, int_list

KERNEL_PROVIDERS = ["ahfa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex"]


def add_parser(subparsers) -> None:
    import torch

    sp = add_command(subparsers, "speed", "speed of ahfa vs SDPA backends, FlexAttention, flash-attn: kernels, "
                     "a whole model, or a model's attention calls", __doc__)
    sp.add_argument("--seq-lens", type=int_list, default=[1024, 2048, 4096, 8192, 16384, 32768],
                    help="sequence lengths, comma-separated")
    sp.add_argument("--head-dims", type=int_list, default=[64, 128], help="kernels: head dimensions, comma-separated")
    sp.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"],
                    help="kernels: forward alone and/or forward+backward")
    sp.add_argument("--masks", nargs="+", default=["causal", "full"], choices=["causal", "full"],
                    help="kernels: causal and/or full (bidirectional) attention")
    sp.add_argument("--providers", nargs="+", default=KERNEL_PROVIDERS,
                    help="kernels: implementations to time (ahfa, ahfa-sparse-D for a random layout keeping share D "
                         "of the blocks, ahfa-estimate, sdpa, sdpa-flash, sdpa-cudnn, sdpa-efficient, flex, "
                         "flash-attn); with --attention: the sdpa-cudnn / sdpa-flash to add to sdpa")
    sp.add_argument("--decode-lens", type=int_list, default=[8192, 32768, 131072],
                    help="kernels: KV-cache lengths of the decode sweep, comma-separated")
    sp.add_argument("--tokens", type=int, default=32768, help="kernels: tokens per batch (batch = tokens // seq_len)")
    sp.add_argument("--heads", type=int, default=32, help="kernels: attention heads")
    sp.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="folder of the result files")
    sp.add_argument("--name", default="speed", help="file stem of the JSON/Markdown/PNG results")
    whole = sp.add_argument_group("whole-model mode (with --model): prefill, decode and training step")
    whole.add_argument("--model", help="hub name or local folder; switches to whole-model measurements")
    whole.add_argument("--gguf-file", help="GGUF file inside --model")
    whole.add_argument("--baseline", default="sdpa", help="implementation to compare with (sdpa, eager, ...)")
    whole.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per decode measurement")
    whole.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    whole.add_argument("--prefill-logits", choices=["all", "last"], default="all",
                       help="logits the timed prefill computes: every position's (a plain forward) or the last "
                            "one's (as generate() prefills; with a large vocabulary the output layer otherwise "
                            "dominates a short prefill)")
    whole.add_argument("--rounds", type=int, default=2,
                       help="measure every implementation this many times in alternating order (A B, B A, ...) and "
                            "report the median, so that drift does not favour whichever runs first")
    whole.add_argument("--paired", type=int, default=0, metavar="N",
                       help="also time each ahfa variant's prefill (and its --decode-tokens steps of decoding) "
                            "against the baseline's as N pairs of single calls taking turns, with the speed-up's 95%% "
                            "paired interval (rounds of a host-bound model drift by more than a few percent)")
    whole.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    whole.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on CUDA, float32 elsewhere")
    whole.add_argument("--text", help="a long text file whose tokens the prefills use (default: random tokens)")
    whole.add_argument("--window-start", choices=["auto", "bos", "none"], default="auto",
                       help="token the text starts with: auto = BOS if the tokenizer adds it, bos = always BOS")
    whole.add_argument("--attention", action="store_true",
                       help="time the attention of a prefill alone: every attention call of one forward over "
                            "--text, replayed per provider (ahfa variants, sdpa, and the --providers sdpa-cudnn / "
                            "sdpa-flash)")
    whole.add_argument("--mode", default="exact", choices=["exact", "adaptive", "auto"],
                       help="also measure ahfa in this mode (one variant per --tau)")
    whole.add_argument("--tau", type=float_list, help="adaptive/auto: mass target(s), comma-separated "
                       "(default: the policy's)")
    whole.add_argument("--skip-mass", type=float_list, help="adaptive/auto: in-kernel skipping's bound on the "
                       "dropped mass per row (AdaptivePolicy.skip_mass; inference only), comma-separated: one variant "
                       "per tau and skip mass (default: the policy's, 0 = off)")
    sp.set_defaults(run=run)


def run(args) -> dict[str, Path]:
    """Run the set-up the options ask for; returns the files written."""
    return _model_speed(args) if args.model else _kernel_speed(args)


def _kernel_speed(args) -> dict[str, Path]:
    import torch

    from hf_ahfa.eval.speed import PROVIDERS, known_provider, run_kernel_sweep
    from hf_ahfa.eval.speed_report import write_speed_report

    if not torch.cuda.is_available():
        raise UsageError("kernel benchmarks need a CUDA GPU (pass --model for whole-model measurements)")
    unknown = {p for p in args.providers if not known_provider(p)}
    if unknown:
        raise UsageError(f"unknown --providers {sorted(unknown)}; choose from {PROVIDERS}")
    rows = run_kernel_sweep(
        args.seq_lens, args.head_dims, args.modes, args.providers, [c == "causal" for c in args.masks],
        args.decode_lens, tokens=args.tokens, heads=args.heads,
    )
    paths = write_speed_report(rows, args.out_dir, args.name)
    print(paths["md"].read_text())
    return paths


def _variants(args) -> dict[str, tuple[str, dict]]:
    """ahfa's variants to measure: exact, plus one per ``--tau`` (and ``--skip-mass``) in adaptive/auto mode."""
    from hf_ahfa.eval.runs import adaptive_variants, check_skip_mass, refuse_knobs_in_exact_mode

    out = {"ahfa": ("ahfa", {"mode": "exact"})}
    given = [option for option, value in (("--tau", args.tau), ("--skip-mass", args.skip_mass)) if value is not None]
    refuse_knobs_in_exact_mode(given, args.mode)
    if args.mode != "exact":  # invalid values fail here, before the model loads
        check_skip_mass(args.skip_mass, args.device)
        try:
            fields = adaptive_variants(args.mode, args.tau, args.skip_mass)
        except ValueError as err:
            raise UsageError(f"--mode/--tau/--skip-mass: {err}") from err
        out.update({label: ("ahfa", f) for label, f in fields.items()})
    return out


def _text_tokens(args, tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of ``--text`` (a document-start token first, as ``perplexity`` does)."""
    from hf_ahfa.eval.perplexity_data import document_start_token

    path = Path(args.text)
    if not path.is_file():
        raise UsageError(f"--text {args.text}: no such file")
    ids = tokenizer(path.read_text(), verbose=False)["input_ids"]
    if len(ids) < n:
        raise UsageError(f"--text holds {len(ids)} tokens, --seq-lens needs {n}")
    start = document_start_token(tokenizer, args.window_start)
    return ([start] if start is not None and ids[0] != start else []) + ids[:n]


def _model_speed(args) -> dict[str, Path]:
    from hf_ahfa.eval.model_speed import attach_paired, measure, paired_decode, paired_prefill, write_model_speed_report
    from hf_ahfa.eval.runs import load_causal_lm, resolve_dtype

    if args.paired < 0:
        raise UsageError(f"--paired takes a number of pairs (0: none), got {args.paired}")
    variants = _variants(args)
    dtype = resolve_dtype(args.dtype, args.device)
    model, tokenizer = load_causal_lm(args.model, "ahfa", dtype, args.device, args.gguf_file)
    tokens = _text_tokens(args, tokenizer, max(args.seq_lens)) if args.text else None
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    config = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "baseline": args.baseline,
              "decode_tokens": args.decode_tokens, "text": args.text, "variants": variants,
              "prefill_logits": args.prefill_logits}
    if args.attention:
        return _attention_speed(args, model, tokens, variants, config, max_pos)
    too_long = [L for L in args.seq_lens if max_pos and L + args.decode_tokens > max_pos]
    if too_long:
        raise UsageError(f"--seq-lens {too_long} plus --decode-tokens exceed the model's "
                         f"max_position_embeddings ({max_pos})")
    labels, last = [*variants, args.baseline], args.prefill_logits == "last"
    rows = measure(model, labels, args.seq_lens, args.decode_tokens, train=not args.no_train, policies=variants,
                   tokens=tokens, rounds=args.rounds, last_logits=last)
    if args.paired:
        pairs = paired_prefill(model, labels, args.seq_lens, args.paired, last_logits=last, policies=variants,
                               tokens=tokens)
        attach_paired(rows, pairs)
        if args.decode_tokens:
            pairs = paired_decode(model, labels, args.seq_lens, args.paired, args.decode_tokens, policies=variants,
                                  tokens=tokens)
            attach_paired(rows, pairs, "decode")
    paths = write_model_speed_report(rows, config, args.out_dir, args.name)
    print(paths["md"].read_text())
    return paths


def _attention_speed(args, model, tokens, variants, config, max_pos) -> dict[str, Path]:
    import torch

    import hf_ahfa
    from hf_ahfa.eval.attention_speed import SDPA, capture_calls, measure, write_attention_report

    if tokens is None:
        raise UsageError("--attention needs --text (a long real text): sparsity depends on it")
    policies = {label: None if f["mode"] == "exact" else hf_ahfa.AdaptivePolicy(**f) for label, (_, f) in variants.items()}
    providers = ["sdpa", *[p for p in args.providers if p in SDPA and p != "sdpa"]]
    rows = []
    for L in args.seq_lens:
        ids = torch.tensor(tokens[:L], device=args.device)[None]
        calls = capture_calls(model, ids)
        rows += measure(calls, policies, providers)
        del calls
        torch.cuda.empty_cache()
    paths = write_attention_report(rows, {**config, "text": args.text}, args.out_dir, args.name, max_pos)
    print(paths["md"].read_text())
    return paths
