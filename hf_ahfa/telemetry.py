"""``hf_ahfa.record()``: what each attention call did, for evaluation and debugging.

The router notes one entry per call while a ``record()`` block is active; outside one, noting costs a
context-variable lookup. Entries that need values from the GPU (kept blocks per head) are computed only
while recording, so recording makes calls wait for the GPU.
"""

from __future__ import annotations

import contextlib

# Plain module globals (process-wide), not ContextVars: torch.compile traces reading them, which fullgraph needs.
_records: list | None = None
_layer: int | None = None


@contextlib.contextmanager
def record():
    """Collect one dict per attention call made inside the block (host syncs: for evaluation only).

    Keys: ``layer`` (Transformers' ``layer_idx`` or None), ``q_len``, ``k_len``, ``dtype`` (the dtype the attention
    ran in, e.g. ``"bfloat16"``: under autocast, autocast's), ``path`` (``"sparse"`` or
    ``"exact"``), ``route`` (the router's decision: ``"sdpa"``, ``"sdpa-whole"``, ``"flash-attn-2"`` /
    ``"flash-attn-3"``, ``"reference"``, ``"flash"``, ``"decode"``, ``"adaptive"`` or ``"layout"`` for a given
    ``BlockLayout``), ``backend``, ``reason`` (why an adaptive policy ran exact), and for estimated calls
    ``density`` (kept share of the visible blocks, mean over batch and heads), ``head_density`` (list per head),
    ``dense_heads`` (heads that fell back to all blocks).
    """
    global _records
    outer, _records = _records, []
    try:
        yield _records
    finally:
        _records = outer


def recording() -> bool:
    return _records is not None


@contextlib.contextmanager
def paused():
    """No entries from the calls inside the block (the router's timing runs of a call)."""
    global _records
    outer, _records = _records, None
    try:
        yield
    finally:
        _records = outer


@contextlib.contextmanager
def layer_tag(layer: int | None):
    """Name the layer of the calls inside the block in ``record()``'s entries."""
    global _layer
    outer, _layer = _layer, layer
    try:
        yield
    finally:
        _layer = outer


def note(q, k, **entry) -> None:
    """Add one entry for a call on ``q (B, Q, H, D)``, ``k (B, K, Hkv, D)`` (no-op unless ``record()`` is active)."""
    if _records is not None:
        _records.append({"layer": _layer, "q_len": q.shape[1], "k_len": k.shape[1],
                         "dtype": str(q.dtype).removeprefix("torch."), **entry})
