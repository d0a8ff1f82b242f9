"""``hf_ahfa.record()``: what each attention call did, for evaluation and debugging.

The router notes one entry per call while a ``record()`` block is active; outside one, noting costs a
context-variable lookup. Entries that need values from the GPU (kept blocks per head) are computed only
while recording, so recording makes calls wait for the GPU.
"""

from __future__ import annotations

import contextlib
import contextvars

_records: contextvars.ContextVar[list | None] = contextvars.ContextVar("ahfa_records", default=None)
_layer: contextvars.ContextVar[int | None] = contextvars.ContextVar("ahfa_layer", default=None)


@contextlib.contextmanager
def record():
    """Collect one dict per attention call made inside the block (host syncs: for evaluation only).

    Keys: ``layer`` (Transformers' ``layer_idx`` or None), ``q_len``, ``k_len``, ``path`` (``"sparse"`` or
    ``"exact"``), ``route`` (the router's decision: ``"reference"``, ``"flash"``, ``"decode"``,
    ``"adaptive"`` or ``"layout"`` for a given ``BlockLayout``), ``backend``, ``reason`` (why an adaptive
    policy ran exact), and for estimated calls ``density`` (kept share of the visible blocks, mean over batch and heads),
    ``head_density`` (list per head), ``dense_heads`` (heads that fell back to all blocks).
    """
    records: list[dict] = []
    token = _records.set(records)
    try:
        yield records
    finally:
        _records.reset(token)


def recording() -> bool:
    return _records.get() is not None


@contextlib.contextmanager
def layer_tag(layer: int | None):
    """Name the layer of the calls inside the block in ``record()``'s entries."""
    token = _layer.set(layer)
    try:
        yield
    finally:
        _layer.reset(token)


def note(**entry) -> None:
    """Add one entry (no-op unless ``record()`` is active)."""
    records = _records.get()
    if records is not None:
        records.append({"layer": _layer.get(), **entry})
