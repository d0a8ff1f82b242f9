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


def _model_speed(args) -> None:
    from hf_ahfa.eval.model_speed import measure, write_model_speed_report
    from hf_ahfa.eval.runs import load_causal_lm, resolve_dtype

    dtype = resolve_dtype(args.dtype, args.device)
    model, _ = load_causal_lm(args.model, "ahfa", dtype, args.device, args.gguf_file)
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    too_long = [L for L in args.seq_lens if max_pos and L + args.decode_tokens > max_pos]
    if too_long:
        raise SystemExit(f"ahfa-eval speed: --seq-lens {too_long} plus --decode-tokens exceed the model's "
                         f"max_position_embeddings ({max_pos})")
    rows = measure(model, ["ahfa", args.baseline], args.seq_lens, args.decode_tokens, train=not args.no_train)
    config = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "baseline": args.baseline,
              "decode_tokens": args.decode_tokens}
    print(write_model_speed_report(rows, config, args.out_dir, args.name)["md"].read_text())


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
