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


def safe_exp(x: float) -> float:
    """``exp(x)``, infinite where a float would overflow (a diverging model must not crash the report)."""
    return math.exp(x) if x < 709 else float("inf")


def text_metrics(nll: float, tokens: int, text: str) -> dict:
    """Token perplexity, and lm-evaluation-harness's word perplexity and bits per byte of ``text``."""
    words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    return {"nll": nll, "tokens": tokens, "token_ppl": safe_exp(nll / tokens), "word_ppl": safe_exp(nll / words),
            "bits_per_byte": nll / (n_bytes * math.log(2)), "words": words, "bytes": n_bytes}
