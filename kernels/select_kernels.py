"""Triton kernels of the adaptive mode's selection: the estimator's tiles in, the block-sparse lists out.

``keep_blocks_kernel`` does what ``hf_ahfa.select.select_blocks`` (the reference) does for one query block:
each sampled row's fewest key blocks holding ``tau`` of its mass, their union over the block's rows, the
anchors, the visible blocks; it also counts each head's kept blocks (for the dense fallback).
``compress_kernel`` turns one line of that selection (a query block's key blocks, or a key block's query blocks
for the backward) into the count and ascending index list of ``BlockLayout``, split into the blocks that need
the element mask and the "full" ones. Two launches instead of the reference's sorts, cumulative sums and
scatters (~60 small launches, three sorts over ``B * H * NQ * NK``).

Top-p without a sort: a row keeps block ``i`` iff the blocks with more mass than it hold less than ``tau`` of
the total, ``sum(m_j for m_j > m_i) < tau * sum(m)``. That sum falls as the threshold rises, so the smallest
threshold ``t`` meeting it is found by bisection over the bit patterns of non-negative float32 (their order is
the integers'), 31 passes over the query block's rows at once; a row keeps ``m_i >= t``. This is the reference's
set except that blocks tied at the threshold are all kept (the reference's sort keeps some of them).
"""

import triton
import triton.language as tl


@triton.jit
def keep_blocks_kernel(
    TM, TS, TOUCHED, ANCHORS, KEEP, KEPT, NR, NQ, NK, tau,
    ROWS: tl.constexpr, ROWS_P2: tl.constexpr, ALL: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program: query block i of one (batch, head), its ROWS sampled rows side by side (one bisection for all).
    # TM/TS (B*H, NR, NK) float32: each sampled row's tile max (log2 domain) and sum of exp2 per key block (the
    # estimator's output); TOUCHED/ANCHORS (NQ, NK) uint8; KEEP (B*H, NQ, NK) uint8 out; KEPT (B*H,) int32, this
    # head's kept blocks added
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < NK
    touched = tl.load(TOUCHED + i * NK + offs, mask=inside, other=0) != 0
    if ALL:  # tau >= 1: every visible block
        keep = touched
    else:
        r = tl.arange(0, ROWS_P2)
        rows = i * ROWS + r
        at = (bh * NR + rows)[:, None] * NK + offs[None, :]
        live = ((r < ROWS) & (rows < NR))[:, None] & inside[None, :]
        tile_max = tl.load(TM + at, mask=live, other=float("-inf"))
        tile_sum = tl.load(TS + at, mask=live, other=0.0)
        row_max = tl.max(tile_max, 1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        mass = tile_sum * tl.exp2(tile_max - row_max[:, None])  # 0 where a row sees nothing of the block
        target = tau * tl.sum(mass, 1)
        # per row: the mass above lo holds >= target, above hi < target (hi starts at the row's largest mass)
        lo = tl.zeros([ROWS_P2], dtype=tl.int32)
        hi = tl.max(mass, 1).to(tl.int32, bitcast=True)
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            above = tl.sum(tl.where(mass > mid.to(tl.float32, bitcast=True)[:, None], mass, 0.0), 1)
            lo = tl.where(above < target, lo, mid)
            hi = tl.where(above < target, mid, hi)
        row_keeps = (mass >= hi.to(tl.float32, bitcast=True)[:, None]) & (mass > 0)
        union = tl.max(row_keeps.to(tl.int32), 0) != 0
        keep = (union | (tl.load(ANCHORS + i * NK + offs, mask=inside, other=0) != 0)) & touched
    tl.store(KEEP + (bh * NQ + i) * NK + offs, keep.to(tl.uint8), mask=inside)
    tl.atomic_add(KEPT + bh, tl.sum(keep.to(tl.int32), 0))


@triton.jit
def _write_list(COUNT, INDEX, line, sel, offs, inside, N):
    """Count and ascending indices of ``sel`` (length ``N``) into line ``line``; the slots after the count get
    ``N`` (each slot written once: the j-th unselected entry goes to ``count + j``)."""
    sel = sel & inside
    before = tl.cumsum(sel.to(tl.int32), 0)  # selected entries up to and including this one
    count = tl.sum(sel.to(tl.int32), 0)
    slot = tl.where(sel, before - 1, count + offs - before)
    tl.store(INDEX + line * N + slot, tl.where(sel, offs, N), mask=inside)
    tl.store(COUNT + line, count)


@triton.jit
def compress_kernel(
    KEEP, TOUCHED, FULL, KEPT, LIMIT, COUNT, INDEX, FCOUNT, FINDEX, NQ, NK, NL, N, s_line, s_entry,
    ELEMENT_MASKS: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program: line l of one (batch, head); a line is N entries s_entry apart, lines s_line apart, in the
    # (NQ, NK) grid of KEEP (B*H, NQ, NK), TOUCHED and FULL (NQ, NK) uint8: rows for the forward's lists,
    # columns for the backward's. A head that kept more than LIMIT (a 0-d float32: density_limit * visible
    # blocks) blocks runs every visible block. COUNT/FCOUNT (B*H, NL) int32, INDEX/FINDEX (B*H, NL, N) int32
    l = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < N
    at = l * s_line + offs * s_entry
    touched = tl.load(TOUCHED + at, mask=inside, other=0) != 0
    keep = tl.load(KEEP + bh * NQ * NK + at, mask=inside, other=0) != 0
    keep = tl.where(tl.load(KEPT + bh).to(tl.float32) > tl.load(LIMIT), touched, keep)
    if ELEMENT_MASKS:
        full = offs < 0
    else:
        full = keep & (tl.load(FULL + at, mask=inside, other=0) != 0)
    line = bh * NL + l
    _write_list(COUNT, INDEX, line, keep & ~full, offs, inside, N)
    _write_list(FCOUNT, FINDEX, line, full, offs, inside, N)
