"""ahfa-eval glue: fine-tune on a GLUE task with transformers.Trainer and compare ahfa with a baseline.

Two comparisons:

* a (isolates the attention): fine-tune once with the baseline implementation (first seed), save the
  checkpoint, evaluate it loaded with ahfa and with the baseline. The metrics should agree to rounding.
* b (end to end): fine-tune separately with each implementation over --seeds; mean and standard
  deviation of each metric per implementation, since seed noise on small tasks exceeds a point.
  The baseline run of the first seed is the very run of comparison a, so it is shared, not repeated.

Every finished item (comparison/implementation/seed) is appended to NAME.jsonl; a rerun resumes there
(more --seeds add runs, finished ones are kept). Reports: NAME.json and NAME.md.

    ahfa-eval glue --task mrpc --model bert-base-uncased --seeds 0,1,2
    ahfa-eval glue --task sst2 --model PATH --train-files train.csv --validation-files dev.csv
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

import hf_ahfa
from hf_ahfa.eval.glue_tasks import (HUB_NAMES, TASKS, get_task, glue_metric, load_hub, load_local,
                                     movie_reviews_splits, parse_validation_files, take)
from hf_ahfa.eval.report import markdown_table, provenance, write_atomic, write_json
from hf_ahfa.eval.runs import ResultStore, model_location, process_device, resolve_dtype, verdict
from hf_ahfa.eval.usage import DEFAULT_OUT, UsageError, add_command

ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "xmod")  # positions start at pad_id + 1


def _seeds(items: list[str]) -> list[int]:
    return [int(x) for item in items for x in item.split(",") if x]


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "glue", "GLUE fine-tuning: ahfa vs a baseline attention implementation", __doc__)
    p.add_argument("--task", required=True, choices=list(TASKS), help="GLUE task")
    p.add_argument("--model", default=None, help="hub name or local folder of an encoder (BERT, RoBERTa, ...)")
    p.add_argument("--baseline", default="sdpa", choices=["sdpa", "eager"], help="implementation to compare with")
    p.add_argument("--comparisons", nargs="+", default=["a", "b"], choices=["a", "b"],
                   help="a: one checkpoint evaluated with both; b: fine-tuned with each over --seeds")
    p.add_argument("--mode", default="exact", choices=["exact", "adaptive", "auto"],
                   help="ahfa's attention mode (hf_ahfa.AdaptivePolicy) for every ahfa run; GLUE inputs are "
                        "short, so auto runs exact and adaptive needs --max-length of at least two blocks (256)")
    data = p.add_argument_group("data (default: the GLUE task from the dataset hub)")
    data.add_argument("--dataset", default="nyu-mll/glue", help=f"hub dataset ({' or '.join(HUB_NAMES)})")
    data.add_argument("--train-files", nargs="+", help="local CSV/TSV/JSON/JSONL/parquet with GLUE's column names")
    data.add_argument("--validation-files", nargs="+",
                      help="PATH, or NAME=PATH for several evaluation sets (MNLI: matched=... mismatched=...)")
    data.add_argument("--movie-reviews", metavar="PATH",
                      help="SST-2-like offline set: vaderSentiment's movieReviewSnippets_GroundTruth.txt, or an "
                           "archive that holds it (label = score > 0, zeros dropped, seeded 80/20 split)")
    data.add_argument("--max-train-samples", type=int, help="use at most N training examples (default: all)")
    data.add_argument("--max-eval-samples", type=int, help="use at most N examples per evaluation set (default: all)")
    tr = p.add_argument_group("training")
    tr.add_argument("--epochs", type=float, default=3.0, help="training epochs")
    tr.add_argument("--lr", type=float, default=2e-5, help="learning rate")
    tr.add_argument("--batch-size", type=int, default=32, help="examples per device and step")
    tr.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    tr.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="e.g. 0,1,2 or 0 1 2")
    tr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when visible")
    tr.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="mixed-precision compute (weights stay float32); auto is bf16 on CUDA")
    tr.add_argument("--lora", action="store_true", help="LoRA through peft instead of full fine-tuning")
    tr.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    tr.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling numerator")
    tr.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the LoRA input")
    tr.add_argument("--lora-targets", nargs="+", default=None, help="module names (default: peft's for the model)")
    out = p.add_argument_group("output")
    out.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="folder of the result files")
    out.add_argument("--name", default=None, help="file stem of the results (default: glue-TASK)")
    out.add_argument("--threshold", type=float, default=0.01, help="largest relative loss of a metric that still passes")
    out.add_argument("--work-dir", type=Path, default=None,
                     help="checkpoints and Trainer output (default: OUT_DIR/NAME-work, removed after a finished run)")
    out.add_argument("--keep-checkpoints", action="store_true", help="keep --work-dir after a finished run")
    p.set_defaults(run=run)


# ---------------------------------------------------------------------------------------------- set-up
def _check_args(args) -> None:
    if not args.model:
        raise UsageError("pass --model (a hub name or a local folder)")
    if bool(args.train_files) != bool(args.validation_files):
        raise UsageError("--train-files and --validation-files go together")
    if args.movie_reviews and (args.train_files or args.task != "sst2"):
        raise UsageError("--movie-reviews is an SST-2-like set: use it with --task sst2 "
                         "and without --train-files")
    if not _seeds(args.seeds):
        raise UsageError("--seeds is empty")


def _model_config(model: str, max_length: int):
    from huggingface_hub import is_offline_mode
    from transformers import AutoConfig

    model = model_location(model)
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        offline = " (no such local folder, and the hub is offline: HF_HUB_OFFLINE=1)" \
            if is_offline_mode() else ""
        raise UsageError(f"could not load model {model!r}{offline}: {str(e).splitlines()[0]}") from None
    limit = config.max_position_embeddings
    if config.model_type in ROBERTA_LIKE:
        limit -= (config.pad_token_id or 0) + 1
    if max_length > limit:
        raise UsageError(f"--max-length {max_length} is above the {limit} positions of "
                         f"model {model} ({config.model_type}, max_position_embeddings "
                         f"{config.max_position_embeddings})")
    return model, config


def _data(args, task):
    """``(train, {name: validation set}, description)``, limited to the requested sizes."""
    if args.movie_reviews:
        train, val = movie_reviews_splits(args.movie_reviews)
        evals, source = {"validation": val}, {"movie_reviews": str(Path(args.movie_reviews).resolve())}
    elif args.train_files:
        train = load_local(args.train_files, task, "train")
        evals = {k: load_local(v, task, "validation") for k, v in parse_validation_files(args.validation_files).items()}
        source = {"train_files": [str(Path(f).resolve()) for f in args.train_files],
                  "validation_files": {k: [str(Path(f).resolve()) for f in v]
                                       for k, v in parse_validation_files(args.validation_files).items()}}
    else:
        train, evals = load_hub(args.dataset, task)
        source = {"hub": f"{args.dataset}/{task.name}"}
    return take(train, args.max_train_samples), {k: take(v, args.max_eval_samples) for k, v in evals.items()}, source


def _tokenize(ds, tokenizer, task, max_length):
    cols = task.text_columns

    def encode(batch):
        texts = [["" if x is None else str(x) for x in batch[c]] for c in cols]
        return tokenizer(*texts, truncation=True, max_length=max_length)  # two columns: one pair, two segments

    return ds.map(encode, batched=True, remove_columns=list(cols), desc="tokenizing")


# ---------------------------------------------------------------------------------------------- runs
class Context:
    """What every fine-tuning and evaluation of one command shares."""

    def __init__(self, args, task, model_path, tokenizer, train, evals, device, dtype, work_dir):
        self.args, self.task, self.model_path, self.tokenizer = args, task, model_path, tokenizer
        self.train, self.evals, self.device, self.dtype, self.work_dir = train, evals, device, dtype, work_dir
        self.metric, self.metric_source = glue_metric(task)

    def training_args(self, output_dir: Path, seed: int):
        import torch
        from transformers import TrainingArguments

        a = self.args
        return TrainingArguments(
            output_dir=str(output_dir), num_train_epochs=a.epochs, learning_rate=a.lr, seed=seed,
            per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=a.batch_size,
            use_cpu=self.device == "cpu", bf16=self.dtype == torch.bfloat16, fp16=self.dtype == torch.float16,
            save_strategy="no", eval_strategy="no", report_to=[], logging_steps=50,
            dataloader_num_workers=0, dataloader_pin_memory=self.device != "cpu",
        )

    def load_model(self, path: str, impl: str, for_training: bool):
        from transformers import AutoModelForSequenceClassification

        import hf_ahfa  # noqa: F401  (registers "ahfa")

        kw = dict(num_labels=self.task.num_labels, ignore_mismatched_sizes=True,
                  problem_type="regression" if self.task.regression else "single_label_classification")
        return AutoModelForSequenceClassification.from_pretrained(
            path, attn_implementation=impl, **(kw if for_training else {}))

    def trainer(self, model, output_dir: Path, seed: int):
        from transformers import DataCollatorWithPadding, Trainer

        return Trainer(model=model, args=self.training_args(output_dir, seed), train_dataset=self.train,
                       data_collator=DataCollatorWithPadding(self.tokenizer), processing_class=self.tokenizer)

    def predict(self, trainer) -> tuple[dict, dict, float]:
        """Metrics (flat: ``metric`` or ``set/metric``), raw predictions per set, seconds."""
        start, metrics, raw = time.perf_counter(), {}, {}
        for name, ds in self.evals.items():
            logits = np.asarray(trainer.predict(ds).predictions, dtype=np.float64)
            preds = logits[:, 0] if self.task.regression else logits.argmax(-1)
            values = self.metric(preds, np.asarray(ds["label"]))
            raw[name] = logits
            metrics.update({m if len(self.evals) == 1 else f"{name}/{m}": v for m, v in values.items()})
        return metrics, raw, time.perf_counter() - start


def _fine_tune(ctx: Context, impl: str, seed: int, output_dir: Path):
    """One fine-tuning; returns the Trainer (its model trained) and the training numbers."""
    from transformers import set_seed

    set_seed(seed)  # the new classification head is drawn from it
    model = ctx.load_model(ctx.model_path, impl, for_training=True)
    a = ctx.args
    if a.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=a.lora_r, lora_alpha=a.lora_alpha,
                                                 lora_dropout=a.lora_dropout, target_modules=a.lora_targets))
    trainer = ctx.trainer(model, output_dir, seed)
    start = time.perf_counter()
    out = trainer.train()
    stats = {"train_loss": out.training_loss, "train_steps": out.global_step,
             "train_seconds": time.perf_counter() - start, "trainable_params":
             sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return trainer, stats


def _common(ctx: Context) -> dict:
    return {"n_train": len(ctx.train), "n_eval": {k: len(v) for k, v in ctx.evals.items()},
            "metric_source": ctx.metric_source}


def _comparison_a(ctx: Context, store: ResultStore, seed: int) -> None:
    base = ctx.args.baseline
    keys = {impl: f"a/{impl}/seed{seed}" for impl in (base, "ahfa")}
    if all(k in store for k in keys.values()):
        return
    ckpt = ctx.work_dir / f"a-{base}-seed{seed}" / "final"
    stats_file = ckpt / "train_stats.json"
    saved = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    if saved.get("config") == store.config:  # trained before an interruption: evaluate the saved checkpoint
        stats = saved["stats"]
        print(f"[a] reusing the fine-tuned checkpoint {ckpt}")
    else:
        print(f"[a] fine-tuning with {base}, seed {seed}")
        trainer, stats = _fine_tune(ctx, base, seed, ckpt.parent)
        model = trainer.model
        if ctx.args.lora:
            model = model.merge_and_unload()  # a plain checkpoint that loads with any implementation
        if store.state.is_main_process:  # one writer under `accelerate launch`
            model.save_pretrained(ckpt)
            ctx.tokenizer.save_pretrained(ckpt)
            # written last, it marks a complete checkpoint of this configuration
            write_atomic(stats_file, json.dumps({"config": store.config, "stats": stats}))
        store.state.wait_for_everyone()  # every process evaluates the saved checkpoint
        del trainer, model
    results = {}
    for impl in (base, "ahfa"):
        model = ctx.load_model(str(ckpt), impl, for_training=False)
        trainer = ctx.trainer(model, ckpt.parent / f"eval-{impl}", seed)
        results[impl] = ctx.predict(trainer)
        print(f"[a] evaluated with {impl}: {_fmt_metrics(results[impl][0])}")
    (mb, rb, tb), (ma, ra, ta) = results[base], results["ahfa"]
    diff = max(float(np.abs(ra[k] - rb[k]).max()) for k in rb)
    agree = float(np.mean(np.concatenate([(ra[k].argmax(-1) == rb[k].argmax(-1)) for k in rb])))
    common = {"comparison": "a", "seed": seed, "trained_with": base, **stats, **_common(ctx)}
    store.add(keys[base], implementation=base, metrics=mb, eval_seconds=tb, **common)
    store.add(keys["ahfa"], implementation="ahfa", metrics=ma, eval_seconds=ta, max_abs_logit_diff=diff,
              prediction_agreement=None if ctx.task.regression else agree, **common)


def _comparison_b(ctx: Context, store: ResultStore, seed: int, impl: str) -> None:
    key = f"b/{impl}/seed{seed}"
    if key in store:
        return
    shared = f"a/{impl}/seed{seed}"
    if shared in store and store.items[shared]["trained_with"] == impl:  # the very same fine-tuning
        row = {k: v for k, v in store.items[shared].items() if k not in ("key", "comparison")}
        store.add(key, comparison="b", shared_with=shared, **row)
        return
    print(f"[b] fine-tuning with {impl}, seed {seed}")
    out_dir = ctx.work_dir / f"b-{impl}-seed{seed}"
    trainer, stats = _fine_tune(ctx, impl, seed, out_dir)
    metrics, _, seconds = ctx.predict(trainer)
    print(f"[b] {impl} seed {seed}: {_fmt_metrics(metrics)}")
    store.add(key, comparison="b", implementation=impl, seed=seed, trained_with=impl, metrics=metrics,
              eval_seconds=seconds, **stats, **_common(ctx))
    shutil.rmtree(out_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- summary
def _fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def summarize(rows: list[dict], base: str, threshold: float, seeds: list[int]) -> dict:
    """Per metric: comparison a's verdict, comparison b's means, standard deviations and noise test."""
    summary = {}
    a = {r["implementation"]: r for r in rows if r["comparison"] == "a" and r["seed"] == seeds[0]}
    if base in a and "ahfa" in a:
        summary["a"] = {
            "seed": seeds[0], "max_abs_logit_diff": a["ahfa"].get("max_abs_logit_diff"),
            "prediction_agreement": a["ahfa"].get("prediction_agreement"),
            "metrics": {m: verdict(a["ahfa"]["metrics"][m], v, threshold, higher_is_better=True)
                        for m, v in a[base]["metrics"].items()},
        }
    b = {(r["implementation"], r["seed"]): r for r in rows if r["comparison"] == "b" and r["seed"] in seeds}
    done = [s for s in seeds if (base, s) in b and ("ahfa", s) in b]
    if done:
        metrics = {}
        for m in b[(base, done[0])]["metrics"]:
            vals = {impl: [b[(impl, s)]["metrics"][m] for s in done] for impl in (base, "ahfa")}
            (mb, sb), (ma, sa) = _mean_std(vals[base]), _mean_std(vals["ahfa"])
            v = verdict(ma, mb, threshold, higher_is_better=True)
            # Welch's standard error of the difference of means; "within noise" = |diff| <= 2 of them
            se = math.sqrt((sa ** 2 + sb ** 2) / len(done)) if sa is not None else None
            noise = None if se is None else abs(ma - mb) <= 2 * se
            metrics[m] = {"baseline_mean": mb, "baseline_std": sb, "ahfa_mean": ma, "ahfa_std": sa,
                          "baseline_values": vals[base], "ahfa_values": vals["ahfa"], "difference": ma - mb,
                          "difference_se": se, "within_seed_noise": noise, "relative_change": v["relative_change"],
                          "pass": bool(v["pass"] or noise)}
        summary["b"] = {"seeds": done, "metrics": metrics}
    return summary


def _rel(change: float) -> str:
    return f"{change:+.3%}" if math.isfinite(change) else "n/a (baseline 0)"


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def write_report(out_dir: Path, name: str, config: dict, rows: list[dict], summary: dict) -> dict[str, Path]:
    meta = provenance()
    paths = {ext: Path(out_dir) / f"{name}.{ext}" for ext in ("json", "md")}
    write_json(paths["json"], meta, rows, config=config, summary=summary)
    base, data, n_eval = config["baseline"], config["data"], config["n_eval"]
    if "movie_reviews" in data:
        data = f"movie reviews `{data['movie_reviews']}`"
    elif "hub" in data:
        data = f"hub `{data['hub']}`"
    else:
        files = [*data["train_files"], *sum(data["validation_files"].values(), [])]
        data = "local files " + ", ".join(f"`{f}`" for f in files)
    n_eval = ", ".join(f"{v}" if k == "validation" else f"{k} {v}" for k, v in n_eval.items())
    training = f"LoRA r={config['lora_r']}" if config["lora"] else "full fine-tuning"
    md = [f"# GLUE {config['task']}: ahfa vs {base}", "",
          f"Model `{config['model']}`, data: {data}; {config['n_train']} training / {n_eval} evaluation examples; "
          f"{config['epochs']:g} epoch(s), lr {config['lr']:g}, batch {config['batch_size']}, max length "
          f"{config['max_length']}, {training}, {config['device']} {config['dtype']}, mode {config['mode']}.",
          f"torch {meta['torch']}, transformers {meta['transformers']}, commit {meta['commit'][:12]}, {meta['date']}. "
          f"Metrics: {rows[0]['metric_source'] if rows else '-'}."]
    if "a" in summary:
        s = summary["a"]
        md += ["", f"## a. One checkpoint (fine-tuned with {base}, seed {s['seed']}) evaluated with both",
               "", markdown_table(
                   ["metric", base, "ahfa", "relative change", f"verdict (threshold {config['threshold']:g})"],
                   [[m, f"{v['baseline']:.4f}", f"{v['ahfa']:.4f}", _rel(v["relative_change"]),
                     "PASS" if v["pass"] else "FAIL"] for m, v in s["metrics"].items()]),
               "", f"Largest logit difference {s['max_abs_logit_diff']:.2e}"
               + ("" if s["prediction_agreement"] is None else
                  f"; predictions agree on {s['prediction_agreement']:.2%} of the examples") + "."]
    if "b" in summary:
        s = summary["b"]
        md += ["", f"## b. Fine-tuned with each implementation, seeds {', '.join(map(str, s['seeds']))} "
                   "(mean ± sample std)", "",
               markdown_table(["metric", base, "ahfa", "difference", "relative change", "within seed noise",
                               "verdict"],
                              [[m, _pm(v["baseline_mean"], v["baseline_std"]), _pm(v["ahfa_mean"], v["ahfa_std"]),
                                f"{v['difference']:+.4f}", _rel(v["relative_change"]),
                                "n/a (one seed)" if v["within_seed_noise"] is None else
                                ("yes" if v["within_seed_noise"] else "no"), "PASS" if v["pass"] else "FAIL"]
                               for m, v in s["metrics"].items()]),
               "", "Within seed noise: |difference| at most twice its standard error "
                   "sqrt((std_ahfa² + std_base²)/seeds). PASS: ahfa no worse than the threshold, or within noise."]
    md += ["", "## Runs", "", markdown_table(
        ["comparison", "trained with", "evaluated with", "seed", "metrics", "train loss", "train s"],
        [[r["comparison"], r["trained_with"], r["implementation"], r["seed"], _fmt_metrics(r["metrics"]),
          f"{r['train_loss']:.4f}", f"{r['train_seconds']:.0f}"] for r in rows])]
    write_atomic(paths["md"], "\n".join(md) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------- command
def run(args) -> dict[str, Path]:
    """Fine-tune and evaluate as the comparisons ask, write NAME.json/NAME.md and print the report.

    Returns the files written (and the kept checkpoints; {} off the main process of ``accelerate launch``)."""
    import torch
    from transformers import AutoTokenizer

    _check_args(args)
    task = get_task(args.task)
    model_path, _ = _model_config(args.model, args.max_length)
    device = process_device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible")
    dtype = resolve_dtype(args.dtype, device)
    seeds = list(dict.fromkeys(_seeds(args.seeds)))
    name = args.name or f"glue-{task.name}"
    train, evals, source = _data(args, task)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = {
        "task": task.name, "model": args.model, "data": source, "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples, "baseline": args.baseline, "mode": args.mode,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
        "device": device, "dtype": str(dtype).removeprefix("torch."), "lora": args.lora,
        **({"lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "lora_targets": args.lora_targets} if args.lora else {}),
    }
    # seeds, comparisons and the threshold stay out of the stored configuration: changing them reuses finished runs
    # under `accelerate launch` every process takes part in each fine-tuning (Trainer runs data-parallel),
    # so the store is shared (not sharded) and only the main process writes it and the report
    store = ResultStore(Path(args.out_dir) / f"{name}.jsonl", config, shard=False)
    work_dir = args.work_dir or Path(args.out_dir) / f"{name}-work"
    encode = lambda ds: _tokenize(ds, tokenizer, task, args.max_length)  # noqa: E731
    ctx = Context(args, task, model_path, tokenizer, encode(train), {k: encode(v) for k, v in evals.items()},
                  device, dtype, work_dir)
    with hf_ahfa.override(mode=args.mode):  # the ahfa runs of this command use --mode
        if "a" in args.comparisons:
            _comparison_a(ctx, store, seeds[0])
        if "b" in args.comparisons:
            for seed in seeds:
                for impl in (args.baseline, "ahfa"):
                    _comparison_b(ctx, store, seed, impl)
    if not store.gather():
        return {}
    rows = [r for r in store.rows() if r["seed"] in seeds and r["comparison"] in args.comparisons]
    summary = summarize(rows, args.baseline, args.threshold, seeds)
    full_config = {**config, "seeds": seeds, "comparisons": args.comparisons, "threshold": args.threshold,
                   "n_train": len(train), "n_eval": {k: len(v) for k, v in evals.items()}}
    paths = write_report(args.out_dir, name, full_config, rows, summary)
    if args.keep_checkpoints:
        paths["checkpoints"] = work_dir
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(paths["md"].read_text())
    return paths
