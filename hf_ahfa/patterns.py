"""Fixed sparse patterns (the Longformer / BigBird family) as ``BlockLayout`` factories.

Every pattern is defined on blocks: query block ``i`` (tokens ``[i * block, (i + 1) * block)``) has its
diagonal at key block ``diag(i)``, the block of the key aligned with the query block's first token the way
``causal=True`` aligns them (bottom-right when there are more keys than queries). With ``nq`` / ``nk`` query /
key blocks and ``diag(i) = (i * block + k_len - q_len) // block``, a tile ``(i, j)`` is kept by

* ``local(width)``:        ``|j - diag(i)| <= width``
* ``strided(stride)``:     ``(diag(i) - j) % stride == 0``  (dilated: every ``stride``-th block back and ahead)
* ``global_blocks(n)``:    ``j < n`` or ``i < n``  (the first ``n`` blocks see and are seen by everything)
* ``random_blocks(n, seed)``: ``n`` key blocks per query block and head, drawn without replacement
* ``union(a, b, ...)``:    any of them

A call's own rules still apply on top (``causal=True`` drops the tiles above the diagonal, a window the
tiles outside it). Use with ``hf_ahfa.attention(q, k, v, causal=True, layout=union(local(q_len, k_len,
block=64, width=2, heads=H), global_blocks(q_len, k_len, block=64, n=1, heads=H)))``, or per model as a
policy: ``hf_ahfa.configure(model, mode="pattern", pattern="local:width=2+global_blocks:n=1", block_size=64)``
(``parse`` reads the spec: factories joined by ``+``, each ``name:param=int,...``).
"""

from __future__ import annotations

import functools

import torch

from hf_ahfa.block_layout import BlockLayout


def _grid(q_len, k_len, block):
    if not isinstance(block, int) or isinstance(block, bool) or block < 16 or block % 16:
        raise ValueError(f"block must be a positive multiple of 16 (the kernels' tile), got {block!r}")
    for name, n in (("q_len", q_len), ("k_len", k_len)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    nq, nk = -(-q_len // block), -(-k_len // block)
    i = torch.arange(nq)[:, None]
    diag = (i * block + max(k_len - q_len, 0)) // block
    return i, torch.arange(nk)[None, :], diag


def _layout(keep: torch.Tensor, q_len, k_len, block, batch, heads, device) -> BlockLayout:
    _count("batch", batch, 1)
    _count("heads", heads, 1)
    if keep.dim() == 2:
        keep = keep[None, None].expand(batch, heads, -1, -1)
    keep = keep.contiguous() if device is None else keep.to(device).contiguous()
    return BlockLayout.from_dense(keep, block, block, q_len, k_len)


def _count(name, n, low=0):
    if not isinstance(n, int) or isinstance(n, bool) or n < low:
        raise ValueError(f"{name} must be an int >= {low}, got {n!r}")


def local(q_len: int, k_len: int, *, block: int = 64, width: int = 1, batch: int = 1, heads: int = 1,
          device=None) -> BlockLayout:
    """Blocks within ``width`` of the diagonal (sliding-window attention in blocks)."""
    _count("width", width)
    i, j, diag = _grid(q_len, k_len, block)
    return _layout((j - diag).abs() <= width, q_len, k_len, block, batch, heads, device)


def strided(q_len: int, k_len: int, *, block: int = 64, stride: int = 2, batch: int = 1, heads: int = 1,
            device=None) -> BlockLayout:
    """Every ``stride``-th block from the diagonal on (dilated attention)."""
    _count("stride", stride, 1)
    i, j, diag = _grid(q_len, k_len, block)
    return _layout((diag - j) % stride == 0, q_len, k_len, block, batch, heads, device)


def global_blocks(q_len: int, k_len: int, *, block: int = 64, n: int = 1, batch: int = 1, heads: int = 1,
                  device=None) -> BlockLayout:
    """The first ``n`` key blocks for every query, and every key block for the first ``n`` query blocks."""
    _count("n", n)
    i, j, _ = _grid(q_len, k_len, block)
    return _layout((j < n) | (i < n), q_len, k_len, block, batch, heads, device)


def random_blocks(q_len: int, k_len: int, *, block: int = 64, n: int = 1, seed: int = 0, batch: int = 1,
                  heads: int = 1, device=None) -> BlockLayout:
    """``n`` key blocks per query block, batch row and head, drawn without replacement (``seed``)."""
    _count("n", n)
    i, j, _ = _grid(q_len, k_len, block)
    nq, nk = i.shape[0], j.shape[1]
    scores = torch.rand(batch, heads, nq, nk, generator=torch.Generator().manual_seed(seed))
    keep = torch.zeros(batch, heads, nq, nk, dtype=torch.bool)
    keep.scatter_(-1, scores.topk(min(n, nk), -1).indices, True)
    return _layout(keep, q_len, k_len, block, batch, heads, device)


def union(*layouts: BlockLayout) -> BlockLayout:
    """The tiles any of ``layouts`` keeps (same lengths, block sizes and shape)."""
    if not layouts:
        raise ValueError("union needs at least one layout")
    first = layouts[0]
    for other in layouts[1:]:
        same = (other.block_q, other.block_k, other.q_len, other.k_len, other.shape)
        if same != (first.block_q, first.block_k, first.q_len, first.k_len, first.shape):
            raise ValueError(f"union of layouts over different grids: {same} and "
                             f"{(first.block_q, first.block_k, first.q_len, first.k_len, first.shape)}")
    keep = torch.stack([x.to_dense() for x in layouts]).any(0)
    return BlockLayout.from_dense(keep, first.block_q, first.block_k, first.q_len, first.k_len)


_FACTORIES = {"local": (local, {"width"}), "strided": (strided, {"stride"}), "global_blocks": (global_blocks, {"n"}),
              "random_blocks": (random_blocks, {"n", "seed"})}


def parse(spec: str) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """``"local:width=2+global_blocks:n=1"`` as ``(("local", (("width", 2),)), ("global_blocks", (("n", 1),)))``;
    a ValueError names the part it cannot read."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"pattern must be a non-empty spec such as 'local:width=2+global_blocks:n=1', got {spec!r}")
    parts = []
    for part in spec.split("+"):
        name, _, args = part.strip().partition(":")
        if name not in _FACTORIES:
            raise ValueError(f"pattern part {part!r}: unknown pattern {name!r}; known: {sorted(_FACTORIES)}")
        params = []
        for arg in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = arg.partition("=")
            if not eq or key not in _FACTORIES[name][1] or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"pattern part {part!r}: {arg!r} is not one of {sorted(_FACTORIES[name][1])} "
                                 f"set to an int")
            params.append((key, int(value)))
        parts.append((name, tuple(params)))
    return tuple(parts)


@functools.lru_cache(maxsize=32)
def from_spec(spec: str, q_len: int, k_len: int, block: int, batch: int, heads: int, device) -> BlockLayout:
    """The layout of a ``parse``-able spec for one call shape (cached: built once per shape)."""
    layouts = [_FACTORIES[name][0](q_len, k_len, block=block, batch=batch, heads=heads, device=device, **dict(params))
               for name, params in parse(spec)]
    return union(*layouts) if len(layouts) > 1 else layouts[0]
