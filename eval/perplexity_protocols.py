"""The two perplexity protocols: which items (windows, or book x context length) a run scores, scoring
them with every attention variant into a resumable store, and the per-implementation summary.

``wikitext``: the documents joined and cut into windows (``plan_windows``), token-weighted NLL.
``long``: per book, contexts of each length ending at the same token, scoring the same last tokens.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from itertools import groupby

import torch

import hf_ahfa
from hf_ahfa.eval.perplexity_data import digest, tokenize
from hf_ahfa.eval.perplexity_metrics import (
    block_sums, paired_bootstrap, plan_windows, safe_exp, text_metrics, window_nll,
)
from hf_ahfa.eval.runs import ResultStore, adaptive_variants, relative_change, verdict
from hf_ahfa.eval.usage import UsageError


@dataclass(frozen=True)
class Variant:
    """One attention set-up a run scores: its label in the results, the Transformers implementation,
    and for ahfa the policy fields it runs under (``hf_ahfa.override``)."""

    label: str
    impl: str
    policy: tuple = ()


def variants(args) -> tuple[list[Variant], Variant]:
    """The variants under test (one per ``--tau`` in adaptive/auto mode) and the baseline.

    Invalid policy values raise ``ValueError`` (from ``hf_ahfa.AdaptivePolicy``)."""
    def exact(impl):
        return Variant(impl if impl != "ahfa" or args.mode == "exact" else "ahfa-exact", impl,
                       (("mode", "exact"),) if impl == "ahfa" else ())

    if args.mode == "exact" or args.attn != "ahfa":
        tests = [exact(args.attn)]
    elif args.mode == "saved":  # no override: the model's config.ahfa (per-layer entries included) decides
        tests = [Variant("ahfa-saved", "ahfa")]
    else:
        extra = {"min_length": args.min_sparse_len} if args.min_sparse_len else {}
        extra |= {"block_size": args.block_size} if args.block_size else {}
        extra |= {"stride": args.sample_stride} if args.sample_stride else {}
        sweep = adaptive_variants(args.mode, args.tau, args.skip_mass, **extra)
        tests = [Variant(label, "ahfa", tuple(fields.items())) for label, fields in sweep.items()]
    return tests, exact(args.baseline)


def switch_attention(model, impl: str) -> None:
    """Route every attention layer of ``model`` through ``impl``, and check that it did."""
    from transformers import PretrainedConfig

    model.set_attn_implementation(impl)
    configs = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    wrong = {c._attn_implementation for c in configs if c._attn_implementation != impl}
    if wrong:
        raise RuntimeError(f"set_attn_implementation({impl!r}) left layers on {sorted(wrong)}")


def max_positions(model) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


_warm: set = set()


def timed_nll(model, variant, ids, n_scored, device, start_token=None, per_token=False):
    """NLL of the scored tokens (with ``per_token``: ``(sums, per-token NLLs)``, see ``window_nll``), forward
    seconds and, for ahfa, what its attention calls did.

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
            nll = window_nll(model, ids, n_scored, per_token=per_token)
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


def _score_all(store: ResultStore, by_label: dict, units: list[list], key, forward, desc: str) -> list[dict] | None:
    """Score every item of ``units`` with every variant of ``by_label``, skipping items already in ``store``.

    A unit's items share forward passes: ``forward(variant, todo)`` returns one row per item of ``todo``.
    Under ``accelerate launch`` each process takes its share of the units; returns the rows (item-major)
    on the main process, None on the others.
    """
    from tqdm import tqdm

    items = [x for unit in units for x in unit]
    done = sum(key(impl, x) in store for impl in by_label for x in items)
    with tqdm(total=len(items) * len(by_label), initial=done, desc=desc, unit="item") as bar:
        for u, unit in enumerate(units):
            if not store.mine(u):  # another process of `accelerate launch` takes this unit
                continue
            for impl, variant in by_label.items():
                todo = [x for x in unit if key(impl, x) not in store]
                for x, row in zip(todo, forward(variant, todo) if todo else []):
                    store.add(key(impl, x), impl=impl, **row)
                    bar.update()
    if not store.gather():
        return None
    return [store.items[key(impl, x)] for x in items for impl in by_label]


def mean_density(rows: list[dict]) -> float | None:
    """Mean kept-block share of the rows that ran block-sparse calls (None when none did)."""
    dens = [r["density"] for r in rows if r.get("density") is not None]
    return sum(dens) / len(dens) if dens else None


def _layer_density(rows: list[dict]) -> dict:
    per: dict = {}
    for r in rows:
        for layer, d in (r.get("layer_density") or {}).items():
            per.setdefault(layer, []).append(d)
    return {k: sum(v) / len(v) for k, v in sorted(per.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1)}


# ----------------------------------------------------------------------------------------------- wikitext


def _windows(args, model, ids: list[int]) -> tuple[int, int, list[tuple[int, int, int]]]:
    """``(window length, stride, windows)`` over the token stream, checked against the model."""
    max_pos = max_positions(model)
    if args.max_length is not None and max_pos is not None and args.max_length > max_pos:
        raise UsageError(f"--max-length {args.max_length} is longer than the model allows "
                         f"(max_position_embeddings {max_pos})")
    if len(ids) < 2:
        raise UsageError(f"the data holds {len(ids)} token(s); nothing to score")
    window = args.max_length or min(max_pos or 2048, 2048)
    if args.stride is not None and args.stride > window:
        raise UsageError(f"--stride {args.stride} is longer than the window (--max-length {window})")
    max_length = min(window, len(ids))  # a short text is one window
    stride = min(args.stride or window, max_length)
    return max_length, stride, plan_windows(len(ids), max_length, stride)


def run_wikitext(args, model, tokenizer, texts, labels, config, store_path):
    """Score the joined documents window by window; ``(rows, summary, notes)`` or None off the main process."""
    ids, covered = tokenize(tokenizer, "\n\n".join(texts), args.max_tokens)
    max_length, stride, windows = _windows(args, model, ids)
    config.update(max_length=max_length, stride=stride, tokens=len(ids), tokens_sha1=digest([ids]))
    store = ResultStore(store_path, config)
    tests, base = variants(args)
    by_label = {v.label: v for v in (*tests, base)}
    stream = torch.tensor(ids, device=args.device)

    def forward(variant, todo):
        inputs = torch.stack([stream[windows[w][0]:windows[w][1]] for w in todo])
        n_scored = [windows[w][1] - windows[w][2] for w in todo]
        nll, seconds, attn = timed_nll(model, variant, inputs, n_scored, args.device, config["window_start_token"])
        return [dict(window=w, begin=windows[w][0], end=windows[w][1], nll=loss, tokens=n,
                     seconds=seconds / len(todo), **attn) for w, n, loss in zip(todo, n_scored, nll)]

    # Consecutive windows of equal length share a forward pass; the last one is usually shorter.
    batches = []
    for _, group in groupby(range(len(windows)), key=lambda w: windows[w][1] - windows[w][0]):
        group = list(group)
        batches += [group[k:k + args.batch_size] for k in range(0, len(group), args.batch_size)]
    rows = _score_all(store, by_label, batches, lambda impl, w: f"{impl}/window{w:06d}", forward, "windows")
    if rows is None:
        return None
    return rows, _wikitext_summary(rows, tests, base, covered, len(windows), len(ids), args.threshold), []


def _wikitext_summary(rows, tests, base, covered, n_windows, n_tokens, threshold) -> dict:
    per_impl = {}
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == impl]
        per_impl[impl] = {**text_metrics(sum(r["nll"] for r in mine), sum(r["tokens"] for r in mine), covered),
                          "seconds": sum(r["seconds"] for r in mine), "density": mean_density(mine)}
    b = per_impl[base.label]
    verdicts = {t.label: verdict(per_impl[t.label]["token_ppl"], b["token_ppl"], threshold, higher_is_better=False)
                for t in tests}
    ours = per_impl[tests[0].label]
    return {
        "impls": per_impl, "windows": n_windows, "tokens_total": n_tokens, "baseline": base.label,
        "verdict": verdicts[tests[0].label], "verdicts": verdicts,
        "relative_change": {m: relative_change(ours[m], b[m]) for m in ("token_ppl", "word_ppl", "bits_per_byte")},
    }


# --------------------------------------------------------------------------------------------------- long

DEFAULT_SCORE_TOKENS = 4096


def _context_lengths(args, model, notes: list[str]) -> list[int]:
    """The ``--context-lengths`` the model can take (the others noted), checked against ``--score-tokens``."""
    max_pos = max_positions(model)
    lengths = sorted(set(args.context_lengths))
    if max_pos is not None and max(lengths) > max_pos:
        notes.append(f"context lengths {[c for c in lengths if c > max_pos]} skipped: longer than the model's "
                     f"max_position_embeddings ({max_pos})")
        lengths = [c for c in lengths if c <= max_pos]
    if not lengths:
        raise UsageError(f"--context-lengths {args.context_lengths}: all are longer than the model allows ({max_pos})")
    if args.score_tokens is None:  # enough tokens to resolve a fraction of a percent, half the shortest context
        args.score_tokens = min(DEFAULT_SCORE_TOKENS, min(lengths) // 2)
    if args.score_tokens >= min(lengths):
        raise UsageError(f"--score-tokens {args.score_tokens} must be shorter than the shortest context length "
                         f"({min(lengths)}): each scored token needs context")
    return lengths


def _book_items(books, labels, lengths, notes: list[str]) -> list[tuple[int, int, int]]:
    """``(doc, ctx, end)`` per book and context length: the input is tokens ``[end - ctx, end)`` of the doc."""
    items = []
    for d, ids in books:
        end = min(len(ids), max(lengths))
        fits = [c for c in lengths if c <= end]
        if len(fits) < len(lengths):
            notes.append(f"{labels[d]}: {len(ids)} tokens; context lengths {[c for c in lengths if c > end]} "
                         "skipped (the book is shorter)")
        items += [(d, c, end) for c in fits]
    if not items:
        raise UsageError(f"no document has {min(lengths)} tokens (the shortest context length)")
    return items


def run_long(args, model, tokenizer, texts, labels, config, store_path):
    """Score each book at each context length; ``(rows, summary, notes)`` or None off the main process."""
    notes: list[str] = []
    lengths = _context_lengths(args, model, notes)
    books = [(d, tokenize(tokenizer, t, args.max_tokens)[0]) for d, t in enumerate(texts) if t.strip()]
    if len(books) < len(texts):
        notes.append(f"{len(texts) - len(books)} empty document(s) left out")
    items = _book_items(books, labels, lengths, notes)
    config.update(context_lengths=lengths, score_tokens=args.score_tokens,
                  tokens_sha1=digest([ids for _, ids in books]))
    store = ResultStore(store_path, config)
    tests, base = variants(args)
    tokens = dict(books)

    def forward(variant, todo):
        ((d, c, end),) = todo
        inputs = torch.tensor(tokens[d][end - c:end], device=args.device)[None]
        ((nll,), (token_nll,)), seconds, attn = timed_nll(model, variant, inputs, [args.score_tokens], args.device,
                                                          config["window_start_token"], per_token=True)
        return [dict(doc=d, title=labels[d], ctx=c, end=end, nll=nll, tokens=args.score_tokens,
                     ppl=safe_exp(nll / args.score_tokens), seconds=seconds, nll_blocks=block_sums(token_nll), **attn)]

    key = lambda impl, item: f"{impl}/doc{item[0]:05d}/ctx{item[1]}"  # noqa: E731
    rows = _score_all(store, {v.label: v for v in (*tests, base)}, [[x] for x in items], key, forward,
                      "books x contexts")
    if rows is None:
        return None
    return rows, _long_summary(rows, tests, base, lengths, args.threshold), notes


def _long_verdict(test_rows, base_rows, ppl, base_ppl, threshold) -> dict:
    """The verdict of one context length: with the scored tokens' block NLLs (rows of this version), ahfa passes
    when the upper end of the 95% paired-bootstrap interval of its perplexity change is within ``threshold``;
    the point estimate decides only for rows written without them."""
    v = verdict(ppl, base_ppl, threshold, False)
    base = {r["doc"]: r for r in base_rows}
    pairs = [(r, base[r["doc"]]) for r in test_rows if r["doc"] in base]
    if pairs and all("nll_blocks" in r and "nll_blocks" in b for r, b in pairs):
        lo, hi = paired_bootstrap([r["nll_blocks"] for r, _ in pairs], [b["nll_blocks"] for _, b in pairs],
                                  [r["tokens"] for r, _ in pairs])
        v["ci95"], v["pass"] = [lo, hi], hi <= threshold
    return v


def _long_summary(rows, tests, base, lengths, threshold) -> dict:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by_context = []
    for c in lengths:
        cell = {impl: [r for r in rows if r["impl"] == impl and r["ctx"] == c] for impl in impls}
        if not cell[base.label]:
            continue
        ppl = {impl: safe_exp(sum(r["nll"] for r in rs) / sum(r["tokens"] for r in rs)) for impl, rs in cell.items()}
        verdicts = {t.label: _long_verdict(cell[t.label], cell[base.label], ppl[t.label], ppl[base.label], threshold)
                    for t in tests}
        by_context.append({"ctx": c, "books": len(cell[base.label]), "tokens": sum(r["tokens"] for r in cell[base.label]),
                           "ppl": ppl, "seconds": {i: sum(r["seconds"] for r in rs) for i, rs in cell.items()},
                           "density": {i: mean_density(rs) for i, rs in cell.items()},
                           "layer_density": {i: _layer_density(rs) for i, rs in cell.items()},
                           "verdict": verdicts[tests[0].label], "verdicts": verdicts})
    failing = {t.label: [x["ctx"] for x in by_context if not x["verdicts"][t.label]["pass"]] for t in tests}
    return {"by_context": by_context, "baseline": base.label, "failing_contexts": failing,
            "pass": not any(failing.values())}
