"""The block-sparse layout: which (query block, key block) tiles an attention call computes.

One layout everywhere, in the style of FlexAttention's BlockMask: per (batch, head, query block) a count
and an ascending list of the key blocks that need the element mask (causal diagonal, window edges,
padding), and a second count/list of "full" blocks computed without any mask; for the backward, the same
two lists transposed (per key block, the query blocks that list it). Users and tests build one with
``from_dense``; the adaptive selection produces one; ``resolve`` fits one to a call's masks, which is the
form the block-sparse kernels take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# the layout's lists, in the order the block-sparse kernels and hf_ahfa::select_lists take them
LIST_FIELDS = ("kv_count", "kv_index", "full_count", "full_index", "q_count", "q_index", "full_q_count", "full_q_index")


@dataclass(frozen=True)
class BlockLayout:
    """Selected tiles of a ``q_len x k_len`` attention in blocks of ``block_q x block_k``.

    ``kv_count (B, H, NQ)`` int32 and ``kv_index (B, H, NQ, NK)`` int32: for each query block the number
    of selected key blocks that need the element mask and their indices, ascending, in the first
    ``kv_count`` slots (the rest is padding with ``NK``). ``full_count``/``full_index``: the same for the
    selected blocks that need no mask (disjoint from the first list), or ``None``. ``q_count``/``q_index``
    and ``full_q_count``/``full_q_index``: both lists transposed, ``(B, H, NK[, NQ])``, when built for a
    backward pass, else ``None``.
    """

    kv_count: torch.Tensor
    kv_index: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int
    full_count: torch.Tensor | None = None
    full_index: torch.Tensor | None = None
    q_count: torch.Tensor | None = None
    q_index: torch.Tensor | None = None
    full_q_count: torch.Tensor | None = None
    full_q_index: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, NQ, NK)``."""
        return (*self.kv_count.shape, self.kv_index.shape[-1])

    @staticmethod
    def from_dense(blocks: torch.Tensor, block_q: int, block_k: int, q_len: int, k_len: int,
                   full: torch.Tensor | None = None, transposed: bool = False) -> BlockLayout:
        """From a bool ``(B, H, NQ, NK)`` tile selection, and optionally the tiles of it that need no
        element mask (a subset of ``blocks``); ``transposed`` also builds the backward's lists."""
        for name, size in (("block_q", block_q), ("block_k", block_k)):
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        nq, nk = -(-q_len // block_q), -(-k_len // block_k)
        if blocks.dtype != torch.bool or blocks.dim() != 4 or tuple(blocks.shape[2:]) != (nq, nk):
            raise ValueError(f"blocks must be a bool (B, H, {nq}, {nk}) tensor for q_len={q_len}, "
                             f"k_len={k_len} in blocks of {block_q}x{block_k}, got {blocks.dtype} {tuple(blocks.shape)}")
        if full is not None and (full.shape != blocks.shape or (full & ~blocks).any()):
            raise ValueError("full must be a bool tensor shaped like blocks and a subset of it")
        return _build(blocks if full is None else blocks & ~full, full, block_q, block_k, q_len, k_len, transposed)

    def to_dense(self, full: bool | None = None) -> torch.Tensor:
        """The bool ``(B, H, NQ, NK)`` selection: every selected tile (``full=None``), only the tiles that
        need no mask (``True``) or only those that do (``False``)."""
        if full and self.full_count is None:
            raise ValueError("this layout has no full blocks")
        masked = _expand(self.kv_count, self.kv_index)
        if full is False or self.full_count is None:
            return masked
        unmasked = _expand(self.full_count, self.full_index)
        return unmasked if full else masked | unmasked

    def to_token_mask(self) -> torch.Tensor:
        """The selection expanded to a bool ``(B, H, q_len, k_len)`` mask (for references and tests)."""
        dense = self.to_dense()
        mask = dense.repeat_interleave(self.block_q, dim=2).repeat_interleave(self.block_k, dim=3)
        return mask[:, :, : self.q_len, : self.k_len]

    def density(self, allowed: torch.Tensor | None = None) -> float:
        """Share of tiles computed: of all tiles, or of the ``allowed`` ones (e.g. the causal tiles)."""
        dense = self.to_dense()
        if allowed is None:
            return dense.float().mean().item()
        allowed = allowed.expand_as(dense)
        return (dense & allowed).sum().item() / max(allowed.sum().item(), 1)

    def resolve(self, band: tuple[torch.Tensor, torch.Tensor], *, element_masks: bool,
                backward: bool) -> BlockLayout:
        """This layout fitted to one call, as the block-sparse kernels take it: tiles that no query can see
        under the positional rules dropped, a tile unmasked only where the rules leave all of it visible
        (and this layout's full lists allow it), never under ``element_masks``; transposed lists with
        ``backward``. ``band``: ``band_blocks(...)`` of the call."""
        hint = self.to_dense(full=True) if self.full_count is not None else None
        return fit_to_band(self.to_dense(), hint, band, self.block_q, self.block_k, self.q_len, self.k_len,
                           element_masks=element_masks, backward=backward)


def fit_to_band(selected: torch.Tensor, full_hint: torch.Tensor | None, band, block_q: int, block_k: int,
                q_len: int, k_len: int, *, element_masks: bool, backward: bool) -> BlockLayout:
    """``BlockLayout.resolve`` on a bool ``(B, H, NQ, NK)`` selection (what the adaptive selection yields)."""
    touched, full = band
    selected = selected & touched
    if element_masks:
        full = torch.zeros_like(selected)
    else:
        full = full & selected
        if full_hint is not None:
            full = full & full_hint
    return _build(selected & ~full, full, block_q, block_k, q_len, k_len, backward)


def _build(masked, full, block_q, block_k, q_len, k_len, transposed) -> BlockLayout:
    """A layout of two disjoint bool selections (no checks: no host syncs, traceable by torch.compile)."""
    lists = dict(zip(("kv_count", "kv_index"), _compress(masked)))
    if full is not None:
        lists.update(zip(("full_count", "full_index"), _compress(full)))
    if transposed:
        lists.update(zip(("q_count", "q_index"), _compress(masked.transpose(-1, -2))))
        lists.update(zip(("full_q_count", "full_q_index"), _compress(
            (full if full is not None else torch.zeros_like(masked)).transpose(-1, -2))))
    return BlockLayout(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, **lists)


def _compress(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(..., NK)`` -> count ``(...)`` int32 and ascending indices padded with NK, contiguous."""
    NK = blocks.shape[-1]
    slots = torch.where(blocks, torch.arange(NK, device=blocks.device), NK)
    index = slots.sort(dim=-1).values.to(torch.int32).contiguous()
    return blocks.sum(-1, dtype=torch.int32).contiguous(), index


def _expand(count: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_compress``: the bool ``(..., NK)`` selection."""
    NK = index.shape[-1]
    valid = torch.arange(NK, device=count.device) < count[..., None]
    dense = torch.zeros(*index.shape[:-1], NK + 1, dtype=torch.bool, device=count.device)
    dense.scatter_(-1, torch.where(valid, index, NK).long(), True)
    return dense[..., :NK]


def band_blocks(q_lens: torch.Tensor, k_lens: torch.Tensor, block_q: int, block_k: int, nq: int, nk: int,
                causal: bool, window: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles the positional rules (``hf_ahfa.masks``) touch, and those they leave wholly visible.

    ``q_lens``/``k_lens``: ``(B,)`` lengths per batch row; queries are aligned bottom-right. Returns two
    bool ``(B, 1, nq, nk)``. A "full" tile also lies wholly inside both lengths.
    """
    dev = q_lens.device
    q_lens, k_lens = q_lens.long()[:, None, None], k_lens.long()[:, None, None]
    shift = k_lens - q_lens
    q0 = torch.arange(nq, device=dev)[None, :, None] * block_q
    k_first = torch.arange(nk, device=dev)[None, None, :] * block_k
    q_first = q0 + shift
    q_last = torch.minimum(q0 + block_q, q_lens) - 1 + shift
    k_last = torch.minimum(k_first + block_k, k_lens) - 1
    touched = (q0 < q_lens) & (k_first < k_lens)
    full = touched & (k_first + block_k <= k_lens)
    if causal:
        touched = touched & (k_first <= q_last)
        full = full & (k_last <= q_first)
    if window is not None:
        left, right = window
        touched = touched & (k_last >= q_first - left) & (k_first <= q_last + right)
        full = full & (k_first >= q_last - left) & (k_last <= q_first + right)
    return touched[:, None], full[:, None]
