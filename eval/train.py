"""ahfa-eval train: a long-context LoRA fine-tune, ahfa (e.g. adaptive: the block-sparse backward) against a
baseline, in one run: the loss of every step on the same windows, and the time of a step.

Every variant starts from the same weights and the same LoRA initialisation (peft, --seed) and trains with
transformers.Trainer on the same windows in the same order: --steps windows of --seq-len tokens cut one
after the other from the --data-files books (each window's first token is the document start per
--window-start); where the books hold fewer, the steps go over them again (epochs). CUDA: float32 weights and
LoRA, bf16 autocast (the attention runs in bf16); CPU: float32.
Reported per variant: loss per step, median step time after --warmup-steps (kernel compiles and autotuning
fall in those), peak GPU memory, the kept share of the adaptive mode; against the baseline: the mean loss
change over the steps with a 95% paired bootstrap interval (steps resampled; each step's windows are the
same for both), and the step-time ratio. The verdict: the interval's bounds within +-threshold.

    ahfa-eval train --model PATH --data-files book1.txt book2.txt --seq-len 16384 --steps 200 \\
        --mode adaptive --tau 0.99 --baseline ahfa
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import hf_ahfa
from hf_ahfa.eval import chunked_loss
from hf_ahfa.eval.perplexity import (
    add_adaptive_comparison_arguments, add_model_arguments, checked_comparison, load_compared_model,
)
from hf_ahfa.eval.perplexity_data import document_start_token, joined_books
from hf_ahfa.eval.perplexity_protocols import max_positions, switch_attention
from hf_ahfa.eval.report import markdown_table, paired_change, provenance, write_atomic, write_json
from hf_ahfa.eval.runs import plain_causal_lm, process_device
from hf_ahfa.eval.usage import DEFAULT_OUT, UsageError, add_command


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "train", "long-context LoRA fine-tune: loss and step time, ahfa vs a baseline",
                    __doc__)
    add_model_arguments(p)
    add_adaptive_comparison_arguments(p)
    g = p.add_argument_group("training")
    g.add_argument("--data-files", nargs="+", type=Path, required=True, help="plain-text books the windows come from")
    g.add_argument("--seq-len", type=int, default=16384, help="tokens per window (one window per step)")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps per variant")
    g.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the step time")
    g.add_argument("--lr", type=float, default=2e-4, help="learning rate (AdamW, constant)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling numerator (scale = alpha / r)")
    g.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="module names LoRA adapts")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    g.add_argument("--loss-chunk", type=int, default=0, metavar="N",
                   help="compute the loss N positions at a time without keeping the logits (a large vocabulary's "
                        "logits at 32K tokens outgrow an 80 GB card); 0: the model's own loss")
    g.add_argument("--window-start", choices=["auto", "bos", "none"], default="auto",
                   help="token each window begins with: auto = BOS if the tokenizer adds it, bos = always BOS")
    g.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialisation")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="folder of the result files")
    g.add_argument("--name", default="train", help="file stem of the results")
    g.add_argument("--threshold", type=float, default=0.01,
                   help="largest relative mean-loss change of ahfa over the baseline that passes")
    p.set_defaults(run=run)


def _check_args(args) -> None:
    if args.loss_chunk < 0:
        raise UsageError(f"--loss-chunk must be 0 (off) or positive, got {args.loss_chunk}")
    for option in ("seq_len", "steps", "lora_r", "lora_alpha"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if not 0 <= args.warmup_steps < args.steps:
        raise UsageError(f"--warmup-steps must be in [0, --steps), got {args.warmup_steps}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.dtype not in ("auto", "float32"):
        raise UsageError(f"--dtype {args.dtype}: train keeps float32 weights and LoRA (bf16 autocast on CUDA); "
                         "leave --dtype at auto or float32")
    if args.skip_mass:
        raise UsageError("--skip-mass is for inference: a training step computes every tile of the kept blocks "
                         "(the backward needs them)")


def windows(ids: list[int], seq_len: int, steps: int, start: int | None) -> torch.Tensor:
    """``(n, seq_len)`` token windows cut one after the other from ``ids`` (``start`` replacing each window's first
    token when given), ``n = min(steps, len(ids) // seq_len)``: a fine-tune of more steps than the text holds windows
    goes over them again (Trainer's epochs, in an order the seed fixes: the same for every variant). Raises
    ``UsageError`` where the text holds less than one window."""
    n = min(steps, len(ids) // seq_len)
    if n == 0:
        raise UsageError(f"--data-files hold {len(ids)} tokens, less than one window of --seq-len {seq_len}")
    out = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    if start is not None:
        out[:, 0] = start
    return out


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(base_model, variant, data: torch.Tensor, args, work: Path) -> dict:
    """One LoRA fine-tune of a copy of ``base_model`` under ``variant``: losses, step times, peak memory."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(args.seed)
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_targets, lora_dropout=0.0,
        task_type="CAUSAL_LM"))
    switch_attention(model, variant.impl)
    losses, times = [], []

    class Record(TrainerCallback):
        def on_step_begin(self, *_, **__):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync()
            times.append(time.perf_counter() - self.start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    checkpointing = {}
    if args.gradient_checkpointing:  # renamed "activation_checkpointing" after Transformers 5.17
        name = next(n for n in ("activation_checkpointing", "gradient_checkpointing")
                    if n in TrainingArguments.__dataclass_fields__)
        checkpointing = {name: True, f"{name}_kwargs": {"use_reentrant": False}}
    targs = TrainingArguments(
        output_dir=str(work), max_steps=args.steps, per_device_train_batch_size=1, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        seed=args.seed, data_seed=args.seed, bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0,
        disable_tqdm=False, max_grad_norm=1.0, **checkpointing)
    trainer_class = _chunked_loss_trainer(Trainer, args.loss_chunk) if args.loss_chunk else Trainer
    trainer = trainer_class(model=model, args=targs, train_dataset=_Windows(data), callbacks=[Record()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    policy = hf_ahfa.override(**dict(variant.policy)) if variant.policy else contextlib.nullcontext()
    with policy, hf_ahfa.record() if variant.impl == "ahfa" else contextlib.nullcontext([]) as calls:
        trainer.train()
    if len(losses) != args.steps:
        raise RuntimeError(f"{variant.label}: Trainer logged {len(losses)} losses for {args.steps} steps")
    kept = [c["density"] for c in calls if c.get("density") is not None]
    # (what mixed precision reached the attention: a --loss-chunk run once trained in float32 under bf16=True)
    dtypes = ",".join(sorted({c["dtype"] for c in calls})) or None
    return dict(impl=variant.label, losses=losses, step_s=times, attention_dtype=dtypes,
                median_step_s=statistics.median(times[args.warmup_steps:]),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                kept_share=sum(kept) / len(kept) if kept else None)


def _chunked_loss_trainer(trainer_class, chunk: int):
    """``trainer_class`` computing the loss ``chunk`` positions at a time (``hf_ahfa.eval.chunked_loss``)."""

    class ChunkedLossTrainer(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # (the count reaches the loss where it would reach the model's own, as Trainer.compute_loss passes it)
            count = num_items_in_batch if self.model_accepts_loss_kwargs else None
            # Mixed precision reaches the model through accelerate's wrapper of model.forward, which the decoder
            # called alone bypasses: without this context a bf16 fine-tune ran in float32 (a 32K Gemma-3 step sat
            # for minutes compiling float32 attention kernels)
            with self.accelerator.autocast():
                loss = chunked_loss.compute_loss(model, inputs, chunk, count)
            return (loss, None) if return_outputs else loss

    return ChunkedLossTrainer


def run(args) -> dict[str, Path]:
    """Fine-tune every variant, write ``<name>.json/.md/.png`` and print the summary."""
    _check_args(args)
    args.device = process_device(args.device)
    tests, base = checked_comparison(args)
    model, tokenizer = load_compared_model(args, torch.float32)
    model = plain_causal_lm(model)  # Trainer refuses a model loaded from GGUF; its weights are plain by then
    limit = max_positions(model)
    if limit is not None and args.seq_len > limit:
        raise UsageError(f"--seq-len {args.seq_len} is above the model's {limit} positions")
    model.config.use_cache = False
    text = joined_books(args.data_files)
    data = windows(tokenizer(text, add_special_tokens=False).input_ids, args.seq_len, args.steps,
                   document_start_token(tokenizer, args.window_start))
    if args.loss_chunk:
        # the head's check needs no particular attention: eager's, so that no kernel of ours compiles for its
        # float32 call (a head dim of 256 compiled for minutes on the H100's host)
        switch_attention(model, "eager")
        try:
            chunked_loss.check_head(model, data[:1, :64].to(args.device), args.loss_chunk)
        except ValueError as e:
            raise UsageError(f"--loss-chunk: {e}") from None
        finally:
            switch_attention(model, args.attn)
    config = {"model": args.model, "gguf_file": args.gguf_file, "device": args.device, "seq_len": args.seq_len,
              "steps": args.steps, "warmup_steps": args.warmup_steps, "lr": args.lr, "lora_r": args.lora_r,
              "lora_alpha": args.lora_alpha, "lora_targets": args.lora_targets, "seed": args.seed,
              "gradient_checkpointing": args.gradient_checkpointing, "loss_chunk": args.loss_chunk,
              "data": [str(p) for p in args.data_files],
              "windows": len(data), "variants": [v.label for v in (*tests, base)], "threshold": args.threshold}
    with tempfile.TemporaryDirectory() as work:
        rows = [_train(model, v, data, args, Path(work)) for v in (base, *tests)]
    by = {r["impl"]: r for r in rows}
    summary = []
    for v in tests:
        r = by[v.label]
        change = paired_change(r["losses"], by[base.label]["losses"])
        summary.append(dict(impl=v.label, **change, speed=by[base.label]["median_step_s"] / r["median_step_s"],
                            passed=max(abs(change["low"]), abs(change["high"])) <= args.threshold))
    paths = {ext: Path(args.out_dir) / f"{args.name}.{ext}" for ext in ("json", "md", "png")}
    write_json(paths["json"], provenance(), rows, config=config, summary=summary, baseline=base.label)
    md = _markdown(rows, summary, base.label, config, provenance())
    write_atomic(paths["md"], md)
    _plot(rows, base.label, paths["png"])
    print(md)
    return paths


def _markdown(rows, summary, base, config, meta) -> str:
    lines = [f"# Long-context LoRA fine-tune: {', '.join(s['impl'] for s in summary)} against {base}", "",
             f"Model {config['model']} on {meta.get('gpu') or config['device']}; {config['steps']} steps of one "
             f"{config['seq_len']}-token window, LoRA r={config['lora_r']} on {', '.join(config['lora_targets'])}, "
             f"lr {config['lr']:g}, seed {config['seed']}; step time: median after {config['warmup_steps']} "
             "warm-up steps.", "",
             markdown_table(["implementation", "mean loss", "last loss", "median step s", "peak GiB", "kept share",
                             "attention dtype"],
                            [[r["impl"], f"{statistics.fmean(r['losses']):.4f}", f"{r['losses'][-1]:.4f}",
                              f"{r['median_step_s']:.3f}", "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                              "" if r["kept_share"] is None else f"{r['kept_share']:.3f}", r["attention_dtype"] or ""]
                             for r in rows]), "",
             markdown_table(["implementation", f"mean loss vs {base}", "95% interval", "step speed vs baseline",
                             f"within {config['threshold']:.1%}"],
                            [[s["impl"], f"{s['change']:+.3%}", f"{s['low']:+.3%} .. {s['high']:+.3%}",
                              f"{s['speed']:.2f}x", "yes" if s["passed"] else "no"] for s in summary])]
    return "\n".join(lines) + "\n"


def _plot(rows, base, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        style = dict(linewidth=3, alpha=0.5) if r["impl"] == base else dict(linewidth=1)
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["impl"], **style)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
