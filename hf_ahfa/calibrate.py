"""Per-layer calibration of the adaptive mode against a perplexity budget on sample text.

``calibrate(model, samples, budget=0.005)`` measures, one layer at a time (every other layer exact), the
perplexity change of each candidate ``tau`` on the samples (either way: a drop counts as a change too),
gives each layer the lowest ``tau`` within its share of the budget (``budget / layers``; a layer none of
them fits stays exact), then checks all layers together and raises the ``tau`` of the layer that cost
most until the whole model is within the budget.
The result is stored as the model's policy (``config.ahfa``, saved with ``save_pretrained``), with
``layers_max_length`` = the longest sample: longer contexts run those layers as the rest of the policy says (exact
by default), since the budget was measured up to that length only.

Cost: ``1 + layers x len(taus)`` forward passes over the samples at most, plus the combined checks. With
``mode="auto"`` (the default) a calibrated layer runs block-sparse from ``min_length`` tokens on, where the
kernels make it pay. Calibrate on samples of the lengths you will run (at least two blocks of
``block_size`` tokens: the block-sparse path): the entries hold up to the longest. Perplexity on the samples is
what is bounded; whether the settings generalise to other text is for ``ahfa-eval perplexity`` on held-out text
to show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from hf_ahfa.policy import configure, override, policy_of


@dataclass
class Calibration:
    """What ``calibrate`` found: the stored policy's ``layers`` entries, each layer's perplexity change alone at
    each tau tried, and the whole model's change with all entries (relative: 0.004 is +0.4%)."""

    layers: tuple[tuple[int, str, float], ...]
    alone: dict[int, dict[float, float]] = field(default_factory=dict)
    change: float = 0.0
    base_nll: float = 0.0


def calibrate(model, samples, *, budget: float = 0.005, taus=(0.9, 0.95, 0.98, 0.99), mode: str = "auto",
              progress: bool = True) -> Calibration:
    """Find per-layer ``tau`` values that keep the model's perplexity on ``samples`` within ``budget`` of exact
    attention, and store them in the model's policy (``configure(model, layers=...)``).

    Args:
        model: a causal LM loaded with ``attn_implementation="ahfa"`` whose layers carry ``layer_idx``.
        samples: token ids, ``(B, T)`` tensors or a list of them (each scored with its own ``labels``).
        budget: allowed relative perplexity change of the whole model, up or down (0.005: 0.5%).
        taus: candidate targets, any order; tried from the lowest (sparsest) up.
        mode: the mode written for the calibrated layers: ``"auto"`` (block-sparse where it pays on the
            Triton kernels) or ``"adaptive"`` (always).
        progress: a tqdm bar over the forward passes.
    """
    if mode not in ("auto", "adaptive"):
        raise ValueError(f"mode must be 'auto' or 'adaptive', got {mode!r}")
    if not budget > 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    taus = sorted({float(t) for t in taus})
    if not taus or not all(0.0 < t < 1.0 for t in taus):
        raise ValueError(f"taus must be values in (0, 1), got {taus}")
    samples = [samples] if isinstance(samples, torch.Tensor) else list(samples)
    if not samples or any(not isinstance(s, torch.Tensor) or s.dim() != 2 for s in samples):
        raise ValueError("samples must be a (B, T) tensor of token ids or a non-empty list of them")
    indices = sorted({m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)})
    if not indices:
        raise ValueError("calibrate needs attention modules with a layer_idx (a Transformers model)")
    block = policy_of(model.config).block_size
    if min(s.shape[1] for s in samples) < 2 * block:
        raise ValueError(f"every sample needs at least 2 * block_size = {2 * block} tokens (the sparse path)")

    bar = tqdm(desc="calibrate (forward passes)", disable=not progress)

    def nll(layers) -> float:  # every layer exact but those of these per-layer entries, at any length
        with override(mode="exact", layers=tuple(layers), layers_max_length=0):
            value = _mean_nll(model, samples)
        bar.update()
        return value

    def change(layers) -> float:  # relative perplexity change against exact
        return math.exp(nll(layers) - base) - 1.0

    base = nll(())
    result = Calibration(layers=(), base_nll=base)
    share = budget / len(indices)
    chosen: dict[int, int] = {}  # layer -> index into taus
    for i in indices:
        result.alone[i] = {}
        for j, tau in enumerate(taus):
            result.alone[i][tau] = change([(i, "adaptive", tau)])
            if abs(result.alone[i][tau]) <= share:
                chosen[i] = j
                break
    # all layers together: raise the tau of the costliest layer (or drop it to exact) until within budget
    while chosen:
        entries = [(i, "adaptive", taus[j]) for i, j in chosen.items()]
        result.change = change(entries)
        if abs(result.change) <= budget:
            break
        worst = max(chosen, key=lambda i: abs(result.alone[i][taus[chosen[i]]]))
        if chosen[worst] + 1 < len(taus):
            chosen[worst] += 1
            result.alone[worst][taus[chosen[worst]]] = change([(worst, "adaptive", taus[chosen[worst]])])
        else:
            del chosen[worst]
    result.layers = tuple((i, mode, taus[j]) for i, j in sorted(chosen.items()))
    bar.close()
    if not chosen:
        result.change = 0.0
    configure(model, layers=result.layers, layers_max_length=max(s.shape[1] for s in samples))
    return result


@torch.no_grad()
def _mean_nll(model, samples) -> float:
    """Token-weighted mean next-token negative log-likelihood over the samples."""
    total, count = 0.0, 0
    for ids in samples:
        ids = ids.to(next(model.parameters()).device)
        n = ids.numel() - ids.shape[0]
        total += model(ids, labels=ids).loss.float().item() * n
        count += n
    return total / count

