"""Perplexity arithmetic: which tokens each window scores, the summed NLL of a window, and the token,
word and byte measures of a text (as lm-evaluation-harness defines the last two)."""

from __future__ import annotations

import inspect
import math
import re

import torch
import torch.nn.functional as F

IGNORE = -100
# float32 logits materialized at once by the cross-entropy (64M floats = 256 MB)
LOGIT_BUDGET = 1 << 26


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


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor, budget: int = LOGIT_BUDGET, per_token: bool = False):
    """Summed negative log-likelihood per row.

    ``logits (B, T, V)`` in any float dtype; ``targets (B, T)`` int64, aligned (``logits[b, t]`` is the
    prediction of ``targets[b, t]``), ``IGNORE`` where nothing is scored. The cross-entropy runs in
    float32 on chunks of positions, at most ``budget`` logits at a time.
    Returns ``(nll (B,) float64, count (B,) int64)``, and with ``per_token`` also the NLL of every position
    ``(B, T)`` float64 (0 where nothing is scored).
    """
    B, T, V = logits.shape
    step = max(1, budget // max(1, B * V))
    losses = []
    for s in range(0, T, step):
        chunk = logits[:, s:s + step].float()  # (B, t, V)
        tgt = targets[:, s:s + step]
        loss = F.cross_entropy(chunk.reshape(-1, V), tgt.reshape(-1), ignore_index=IGNORE, reduction="none")
        losses.append(loss.view(B, -1).double())
    tokens = torch.cat(losses, 1) if losses else torch.zeros(B, 0, dtype=torch.float64, device=logits.device)
    out = (tokens.sum(1), (targets != IGNORE).sum(1))
    return (*out, tokens) if per_token else out


# the long protocol's unit of resampling: consecutive scored tokens (the paired block bootstrap keeps the
# correlation between neighbouring tokens inside a block)
BOOTSTRAP_BLOCK = 64


def block_sums(token_nll: torch.Tensor, block: int = BOOTSTRAP_BLOCK) -> list[float]:
    """NLL sums of consecutive ``block``-token pieces of a 1-D tensor of scored tokens (the last may be shorter)."""
    return [float(x.sum()) for x in token_nll.split(block)]


def paired_bootstrap(test: list[list[float]], base: list[list[float]], tokens: list[int], rounds: int = 2000,
                     seed: int = 0, block: int = BOOTSTRAP_BLOCK) -> tuple[float, float]:
    """95% interval of the relative perplexity change ``exp(mean NLL difference) - 1`` of ``test`` over ``base``.

    ``test[d]`` / ``base[d]``: per-block NLL sums of book ``d`` (the same scored tokens, ``tokens[d]`` of them, in
    blocks of ``block``); blocks are resampled with replacement within each book, the books kept as they are.
    """
    gen = torch.Generator().manual_seed(seed)
    diff_sum = torch.zeros(rounds, dtype=torch.float64)
    n_sum = torch.zeros(rounds, dtype=torch.float64)
    for t, b, n in zip(test, base, tokens):
        d = torch.tensor(t, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
        sizes = torch.tensor([min(block, n - i * block) for i in range(len(d))], dtype=torch.float64)
        pick = torch.randint(len(d), (rounds, len(d)), generator=gen)
        diff_sum += d[pick].sum(1)
        n_sum += sizes[pick].sum(1)
    change = torch.expm1(diff_sum / n_sum)
    lo, hi = torch.quantile(change, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def window_nll(model, input_ids: torch.Tensor, n_scored: list[int], per_token: bool = False):
    """NLL of the last ``n_scored[b]`` tokens of each window ``input_ids[b]`` (``(B, T)``, ``n_scored[b] < T``);
    with ``per_token`` also each window's scored tokens' NLLs (a list of 1-D float64 tensors).

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
    nll, _, tokens = sequence_nll(logits, targets, per_token=True)
    if per_token:
        return nll.tolist(), [tokens[b, keep - 1 - n:].cpu() for b, n in enumerate(n_scored)]
    return nll.tolist()


def safe_exp(x: float) -> float:
    """``exp(x)``, infinite where a float would overflow (a diverging model must not crash the report)."""
    return math.exp(x) if x < 709 else float("inf")


def text_metrics(nll: float, tokens: int, text: str) -> dict:
    """Token perplexity, and lm-evaluation-harness's word perplexity and bits per byte of ``text``."""
    words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    return {"nll": nll, "tokens": tokens, "token_ppl": safe_exp(nll / tokens), "word_ppl": safe_exp(nll / words),
            "bits_per_byte": nll / (n_bytes * math.log(2)), "words": words, "bytes": n_bytes}
