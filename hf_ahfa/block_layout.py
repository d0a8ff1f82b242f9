"""The block-sparse layout: which (query block, key block) tiles an attention call computes.

One layout everywhere, in the style of FlexAttention's BlockMask: per (batch, head, query block) a
count and an ascending list of key-block indices, plus an optional second count/list of "full" blocks
that need no element mask (every query of the block sees every key of it). The estimator of the
adaptive mode produces it, the block-sparse kernels consume it, tests build it by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Selected tiles of a ``q_len x k_len`` attention in blocks of ``block_q x block_k``.

    ``kv_count (B, H, NQ)`` int32 and ``kv_index (B, H, NQ, NK)`` int32: for each query block the
    number of selected key blocks and their indices, ascending, in the first ``kv_count`` slots (the
    rest is padding with ``NK``). ``full_count``/``full_index``: the same for the subset that needs no
    element mask, or ``None``.
    """

    kv_count: torch.Tensor
    kv_index: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int
    full_count: torch.Tensor | None = None
    full_index: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, NQ, NK)``."""
        return (*self.kv_count.shape, self.kv_index.shape[-1])

    @staticmethod
    def from_dense(blocks: torch.Tensor, block_q: int, block_k: int, q_len: int, k_len: int,
                   full: torch.Tensor | None = None) -> BlockLayout:
        """From a bool ``(B, H, NQ, NK)`` tile selection (and optionally the tiles that need no mask,
        a subset of ``blocks``)."""
        nq, nk = -(-q_len // block_q), -(-k_len // block_k)
        if blocks.dtype != torch.bool or blocks.dim() != 4 or tuple(blocks.shape[2:]) != (nq, nk):
            raise ValueError(f"blocks must be a bool (B, H, {nq}, {nk}) tensor for q_len={q_len}, "
                             f"k_len={k_len} in blocks of {block_q}x{block_k}, got {blocks.dtype} {tuple(blocks.shape)}")
        if full is not None and (full.shape != blocks.shape or (full & ~blocks).any()):
            raise ValueError("full must be a bool tensor shaped like blocks and a subset of it")
        count, index = _compress(blocks)
        fcount, findex = _compress(full) if full is not None else (None, None)
        return BlockLayout(count, index, block_q, block_k, q_len, k_len, fcount, findex)

    def to_dense(self, full: bool = False) -> torch.Tensor:
        """The bool ``(B, H, NQ, NK)`` selection (of full tiles only with ``full=True``)."""
        count, index = (self.full_count, self.full_index) if full else (self.kv_count, self.kv_index)
        if count is None:
            raise ValueError("this layout has no full blocks")
        B, H, NQ, NK = self.shape
        slot = torch.arange(NK, device=count.device)
        valid = slot < count[..., None]  # (B, H, NQ, NK): which index slots are used
        dense = torch.zeros(B, H, NQ, NK + 1, dtype=torch.bool, device=count.device)
        dense.scatter_(-1, torch.where(valid, index, NK).long(), True)
        return dense[..., :NK]

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

    def kernel_lists(self, *, causal: bool, window: tuple[int, int] | None, q_lens: torch.Tensor,
                     k_lens: torch.Tensor, element_masks: bool, backward: bool):
        """What the block-sparse kernels take: ``(count, index, full_count, full_index)`` per query block
        (masked blocks, then blocks that need no element mask), and with ``backward`` the same lists
        transposed (per key block, the query blocks that listed it), else ``None``.

        Blocks that no query can see under ``causal``/``window`` are dropped; a block runs unmasked only
        when the positional rules leave all of it visible (and this layout's ``full`` allows it), never
        under ``element_masks`` (key padding or a dense mask). ``q_lens``/``k_lens``: ``(B,)`` lengths
        of each batch row (packed sequence). All int32, contiguous, batch and heads expanded.
        """
        return kernel_lists(self.to_dense(), self.to_dense(full=True) if self.full_count is not None else None,
                            self.block_q, self.block_k, causal=causal, window=window, q_lens=q_lens, k_lens=k_lens,
                            element_masks=element_masks, backward=backward)


def kernel_lists(selected: torch.Tensor, full_hint: torch.Tensor | None, block_q: int, block_k: int, *,
                 causal: bool, window, q_lens: torch.Tensor | None, k_lens: torch.Tensor | None, element_masks: bool,
                 backward: bool, band: tuple[torch.Tensor, torch.Tensor] | None = None):
    """``BlockLayout.kernel_lists`` from a bool ``(B, H, NQ, NK)`` selection (and optional full-block hint);
    ``band``: ``band_blocks``' result when the caller has it already (then the lengths are not read)."""
    NQ, NK = selected.shape[-2:]
    touched, full = band or band_blocks(q_lens, k_lens, block_q, block_k, NQ, NK, causal, window)
    selected = selected & touched
    if element_masks:
        full = torch.zeros_like(selected)
    else:
        full = full & selected
        if full_hint is not None:
            full = full & full_hint
    masked = selected & ~full
    rows = (*_compress(masked), *_compress(full))
    cols = (*_compress(masked.transpose(-1, -2)), *_compress(full.transpose(-1, -2))) if backward else None
    return rows, cols


def _compress(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(..., NK)`` -> count ``(...)`` int32 and ascending indices padded with NK."""
    NK = blocks.shape[-1]
    slots = torch.where(blocks, torch.arange(NK, device=blocks.device), NK)
    index = slots.sort(dim=-1).values.to(torch.int32).contiguous()
    return blocks.sum(-1, dtype=torch.int32).contiguous(), index


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

