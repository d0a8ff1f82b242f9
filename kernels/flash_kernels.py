"""Dense flash attention in Triton: forward (with log-sum-exp), backward (dk/dv, then dq), split-KV decode.

Layout ``(B, T, H, D)`` with arbitrary strides; GQA is native (a query head reads k/v head
``h // GROUP``). Scores live in the log2 domain (``exp2``) with the scale folded in. Masks follow
``hf_ahfa.masks`` through ``common.visible``: bottom-right causal, window ``(left, right)``, key padding,
dense boolean mask, packed sequences (``cu_seqlens``). Blocks outside the causal/window band are never
visited, and blocks wholly inside it are visited without any mask arithmetic (``MASKED=False``).

With ``F.sparse`` (a ``LISTS`` argument, ``hf_ahfa.kernels.sparse``) the same kernels visit only the
blocks a block-sparse layout lists: the walk helpers (``_fwd_blocks``...) loop over a key (or query) range
or over listed layout blocks, chosen by that one constexpr.
"""

import triton
import triton.language as tl

from hf_ahfa.kernels.common import (
    LOG2E, alibi_bias, alibi_key_term, alibi_row_term, alibi_slope, finite_values, flags, head_view, key_blocks,
    load_tile, logits, make_ctx, natural_lse, online_softmax, poison_seen, store_tile, tile_ptrs, visible,
)


@triton.jit
def _seq_bounds(CU, seq, T_Q, T_K, F: tl.constexpr):
    """Start row and length of sequence ``seq`` in q and in k (whole tensors when not packed)."""
    if F.varlen:
        cu_q, cu_k = CU
        q_start = tl.load(cu_q + seq).to(tl.int64)
        k_start = tl.load(cu_k + seq).to(tl.int64)
        q_len = (tl.load(cu_q + seq + 1) - q_start).to(tl.int32)
        k_len = (tl.load(cu_k + seq + 1) - k_start).to(tl.int32)
    else:
        q_start = tl.zeros((), tl.int64)
        k_start = tl.zeros((), tl.int64)
        q_len = T_Q
        k_len = T_K
    return q_start, k_start, q_len, k_len


@triton.jit
def _batch_row(b, F: tl.constexpr):
    bm = b.to(tl.int64)
    if F.varlen:
        bm = bm * 0  # packed sequences share batch row 0
    return bm


@triton.jit
def _query_program(KPM, AM, ALIBI, CU, S, T_Q, T_K, H, F: tl.constexpr, BLOCK_M: tl.constexpr):
    """(ctx, sequence, q head, batch row, q start, k start, query block) of a program of a query-block grid."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, k_start, q_len, k_len = _seq_bounds(CU, b, T_Q, T_K, F)
    start_m = tl.program_id(0) * BLOCK_M
    if F.causal:
        # the last query blocks see the most keys: start them first so the tail of the grid is short
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bm = _batch_row(b, F)
    cx = make_ctx(KPM, AM, S, bm, h, q_start, k_start, q_len, k_len, bh, alibi_slope(ALIBI, b, h, F), F)
    return cx, b, h, bm, q_start, k_start, start_m


@triton.jit
def _lists(LISTS, b, h, H, block):
    """Layout row ``(b, h, block)`` of ``LISTS = (count, index, full_count, full_index, rows, slots)``:
    (how many masked blocks, where they are listed, how many full blocks, where those are listed)."""
    count, index, full_count, full_index, rows, slots = LISTS
    row = (b.to(tl.int64) * H + h) * rows + block
    return tl.load(count + row), index + row * slots, tl.load(full_count + row), full_index + row * slots


@triton.jit
def _query_blocks(start_n, cx, F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range ``[lo, hi)`` that may see keys ``start_n .. + BLOCK_N``, and inside it ``[f_lo, f_hi)``
    that fully sees them (the transpose of ``key_blocks``)."""
    shift = cx.k_len - cx.q_len
    lo = 0
    hi = cx.q_len
    if F.causal:
        lo = tl.maximum(0, start_n - shift)
    if F.window:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 + cx.win_left - shift + 1)
        if not F.causal:
            lo = tl.maximum(0, start_n - cx.win_right - shift)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.maximum(hi, 0)
    f_lo = lo
    f_hi = hi
    if F.causal:
        f_lo = tl.maximum(f_lo, tl.cdiv(start_n + BLOCK_N - 1 - shift, BLOCK_M) * BLOCK_M)
    if F.window:
        f_hi = tl.minimum(f_hi, ((start_n + cx.win_left - shift + 1) // BLOCK_M) * BLOCK_M)
        if not F.causal:
            f_lo = tl.maximum(f_lo, tl.cdiv(start_n + BLOCK_N - 1 - shift - cx.win_right, BLOCK_M) * BLOCK_M)
    if F.am or start_n + BLOCK_N > cx.k_len:  # a ragged key block is masked everywhere
        f_lo = hi
    if F.kpm:
        # masked unless the block lies wholly inside a visible span that is one run
        if cx.kpm_run == 0 or start_n < cx.kpm_lo or start_n + BLOCK_N > cx.kpm_hi:
            f_lo = hi
        if start_n >= cx.kpm_hi or start_n + BLOCK_N <= cx.kpm_lo:  # no visible key in this block
            hi = lo
    f_lo = tl.minimum(tl.maximum(f_lo, lo), hi)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), hi)
    return lo, f_lo, f_hi, hi


@triton.jit
def _listed_start(index, j, LAYOUT_B: tl.constexpr, BLOCK: tl.constexpr):
    """Start of the ``j``-th kernel tile of the blocks listed at ``index`` (tiles split layout blocks evenly)."""
    SUB: tl.constexpr = LAYOUT_B // BLOCK
    return tl.load(index + j // SUB) * LAYOUT_B + (j % SUB) * BLOCK


@triton.jit
def _scores(q, k, offs_m, start_n, cx, F: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
            KEYS_HELD: tl.constexpr):
    """Log2-domain scores of a query tile against the key tile at ``start_n`` (and the tanh for the softcap
    gradient); invisible entries are -inf. ``MASKED=False`` is for tiles wholly inside the band: no mask is built.
    ``KEYS_HELD``: called in a loop over query tiles of one key block (``alibi_bias``)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s, t = logits(q, k, cx, F)  # [BM, D] @ [D, BN] -> [BM, BN]
    if F.alibi_keys:
        s = s + alibi_key_term(offs_m, offs_n, cx.k_len - cx.q_len, cx.slope)[None, :]
    elif F.alibi:
        s = alibi_bias(s, offs_m + (cx.k_len - cx.q_len), start_n, BLOCK_N, cx.slope, KEYS_HELD)
    if MASKED:
        ok = visible(offs_m[:, None] + (cx.k_len - cx.q_len), offs_n, offs_m, cx.q_len, cx.k_len,
                     offs_m.to(tl.int64) * cx.am_q, cx, F)
        s = tl.where(ok, s, float("-inf"))
    return s, t


@triton.jit
def _dropout_keep(cx, offs_m, offs_n):
    # one Philox stream per (batch, head); the offset numbers each (query, key) pair of that head
    rnd = tl.rand(cx.seed + cx.bh, offs_m[:, None] * cx.k_len + offs_n[None, :])
    return rnd >= cx.dropout_p


@triton.jit
def _fwd_step(acc, l_i, m_i, dropped, q, k_ptrs, v_ptrs, tma, start_n, offs_m, cx, F: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Online-softmax update of one query block with the key tile at ``start_n``. With ``F.skip``: the tile's
    P @ V is skipped, and its mass left out of the denominator, when every row's ``dropped`` share (an upper
    bound of the mass left out so far) plus this tile's stays within ``cx.skip``. With ``F.tma`` the key and value
    tiles come through the TMA descriptors ``tma = (k, v)`` of the head's rows."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < cx.k_len
    if not MASKED:
        n_ok = offs_n >= 0  # unmasked tiles lie below k_len: let the compiler drop the bound check
    row = start_n
    if F.tma:  # rows past k_len and columns past d read as zero; descriptor offsets are int32 (the key padding
        row = tl.cast(start_n, tl.int32)  # span makes start_n int64)
        k = tma[0].load([row, 0])
    else:
        k = tl.load(k_ptrs, mask=n_ok[:, None] & (tl.arange(0, F.block_d)[None, :] < F.d), other=0.0)
    s, _ = _scores(q, k, offs_m, start_n, cx, F, BLOCK_N, MASKED, False)
    p, alpha, l_i, m_i = online_softmax(s, m_i, l_i, MASKED)
    if F.dropout:
        p = tl.where(_dropout_keep(cx, offs_m, offs_n), p / (1.0 - cx.dropout_p), 0.0)
    acc = acc * alpha[:, None]
    skipped = False
    if F.skip:
        # l_i already holds this tile and only grows: tile / l_i bounds the tile's share of the row's final mass
        tile = tl.sum(p, 1)
        share = tl.where(l_i > 0, tile / tl.where(l_i > 0, l_i, 1.0), 0.0)
        skipped = tl.max(dropped + share, 0) <= cx.skip
        if skipped:
            dropped += share
            l_i -= tile
    if not skipped:
        if F.tma:
            v = tma[1].load([row, 0])
        else:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & (tl.arange(0, F.block_dv)[None, :] < F.dv), other=0.0)
        guard: tl.constexpr = MASKED and F.guard
        if guard:  # a non-finite key needs nothing: its scores are masked where unseen
            v, bad = finite_values(v)
        acc += tl.dot(p.to(v.dtype), v, input_precision=F.precision)  # [BM,BN]@[BN,DV]
        if guard:
            acc = poison_seen(acc, s, bad)
    return acc, l_i, m_i, dropped


@triton.jit
def _fwd_blocks(acc, l_i, m_i, dropped, q, kv, tma, start, end, index, offs_m, cx, F: tl.constexpr,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax of one query block over key tiles ``[start, end)``; with ``F.sparse`` over the
    ``end`` layout blocks listed at ``index``, in one flat loop of tiles so the loads pipeline across blocks."""
    k_view, v_view = kv
    offs_d = tl.arange(0, F.block_d)
    offs_dv = tl.arange(0, F.block_dv)
    if F.sparse:
        for j in range(0, end * (F.layout_bk // BLOCK_N)):
            start_n = _listed_start(index, j, F.layout_bk, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            acc, l_i, m_i, dropped = _fwd_step(acc, l_i, m_i, dropped, q, tile_ptrs(k_view, offs_n, offs_d),
                                               tile_ptrs(v_view, offs_n, offs_dv), tma, start_n, offs_m, cx, F,
                                               BLOCK_N, MASKED)
    else:
        # pointers advance by one block per step instead of being recomputed in 64-bit per element
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ptrs = tile_ptrs(k_view, offs_n, offs_d)
        v_ptrs = tile_ptrs(v_view, offs_n, offs_dv)
        for start_n in range(start, end, BLOCK_N):
            acc, l_i, m_i, dropped = _fwd_step(acc, l_i, m_i, dropped, q, k_ptrs, v_ptrs, tma, start_n, offs_m,
                                               cx, F, BLOCK_N, MASKED)
            k_ptrs += BLOCK_N * k_view.row
            v_ptrs += BLOCK_N * v_view.row
    return acc, l_i, m_i, dropped


@triton.heuristics(dict(F=flags))
@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, LSE, SINKS, KPM, AM, ALIBI, CU, LISTS, T_Q, T_K, H, GROUP, S,
    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, F: tl.constexpr,
):
    # Q, K, V, O: (tensor, *strides) of (B, T, H, D) tensors; LSE (B, H, T_Q) contiguous; SINKS (H,),
    # KPM (tensor, stride_b, stride_k), AM (tensor, 4 strides), CU (cu_seqlens_q, cu_seqlens_k) and LISTS
    # (see _lists) are None when absent. LISTS: per query block the key blocks of a block-sparse layout
    # (hf_ahfa.block_layout), first those that need the element mask, then those that do not. TMA: load the
    # key and value tiles through descriptors made here (common.tma_modes).
    cx, b, h, bm, q_start, k_start, start_m = _query_program(KPM, AM, ALIBI, CU, S, T_Q, T_K, H, F, BLOCK_M)
    if start_m >= cx.q_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, F.block_dv)
    q = load_tile(head_view(Q, bm, h, q_start), offs_m, tl.arange(0, F.block_d), cx.q_len, F.d)
    kv = (head_view(K, bm, h // GROUP, k_start), head_view(V, bm, h // GROUP, k_start))
    tma = None  # passed on as its own argument: triton 3.6 cannot compile a tuple holding None
    if F.tma:
        tma = (tl.make_tensor_descriptor(kv[0].ptr, [cx.k_len, F.d], [kv[0].row, 1], [BLOCK_N, F.block_d]),
               tl.make_tensor_descriptor(kv[1].ptr, [cx.k_len, F.dv], [kv[1].row, 1], [BLOCK_N, F.block_dv]))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, F.block_dv], tl.float32)
    dropped = tl.zeros([BLOCK_M], tl.float32)  # F.skip: each row's bound of the mass left out
    if F.sparse:
        n_masked, masked, n_full, full = _lists(LISTS, b, h, H, start_m // LAYOUT_BQ)
        acc, l_i, m_i, dropped = _fwd_blocks(acc, l_i, m_i, dropped, q, kv, tma, 0, n_masked, masked, offs_m, cx, F,
                                             BLOCK_N, True)
        acc, l_i, m_i, dropped = _fwd_blocks(acc, l_i, m_i, dropped, q, kv, tma, 0, n_full, full, offs_m, cx, F,
                                             BLOCK_N, False)
    else:
        first = start_m + cx.k_len - cx.q_len  # bottom-right alignment
        lo, f_lo, f_hi, hi = key_blocks(first, first + BLOCK_M, cx, F, BLOCK_N)
        # masked window edge, unmasked interior, masked diagonal / ragged end
        acc, l_i, m_i, dropped = _fwd_blocks(acc, l_i, m_i, dropped, q, kv, tma, lo, f_lo, None, offs_m, cx, F,
                                             BLOCK_N, True)
        acc, l_i, m_i, dropped = _fwd_blocks(acc, l_i, m_i, dropped, q, kv, tma, f_lo, f_hi, None, offs_m, cx, F,
                                             BLOCK_N, False)
        acc, l_i, m_i, dropped = _fwd_blocks(acc, l_i, m_i, dropped, q, kv, tma, f_hi, hi, None, offs_m, cx, F,
                                             BLOCK_N, True)

    row_term = 0.0  # the scores' excess over the true logits (AHFA_ALIBI=keys), per row
    if F.alibi_keys:
        row_term = alibi_row_term(offs_m, cx.slope)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    den = l_i
    if F.sinks:
        den = den + tl.exp2(tl.load(SINKS + h).to(tl.float32) * LOG2E + row_term - m_safe)
    out = acc / tl.where(den > 0, den, 1.0)[:, None]  # a row that sees nothing stays 0
    store_tile(head_view(O, bm, h, q_start), offs_m, offs_dv, out, cx.q_len, F.dv)
    # lse is (B, H, Q) contiguous; packed sequences index it by their global row
    tl.store(LSE + (bm * H + h) * T_Q + q_start + offs_m, natural_lse(m_i - row_term, l_i), mask=offs_m < cx.q_len)


@triton.jit
def _probs(s, lse2, offs_m, offs_n, cx, F: tl.constexpr, MASKED: tl.constexpr):
    """Recomputed probabilities ``p`` and their dropped-out version ``pd`` (``p`` when no dropout)."""
    p = tl.exp2(s - lse2[:, None])  # lse2 = +inf for rows that see nothing: p = 0
    if MASKED and F.guard:  # a NaN row (it saw a non-finite value) keeps p = 0 at the keys it cannot see
        p = tl.where(s == float("-inf"), 0.0, p)
    pd = p
    if F.dropout:
        pd = tl.where(_dropout_keep(cx, offs_m, offs_n), p / (1.0 - cx.dropout_p), 0.0)
    return p, pd


@triton.jit
def _dscores(p, dpd, delta, s, t, offs_m, offs_n, cx, F: tl.constexpr, MASKED: tl.constexpr):
    """Gradient w.r.t. the raw scores q.k (before scale and softcap). dpd = dO @ V^T: [BM, BN]."""
    dp = dpd
    if F.dropout:
        dp = tl.where(_dropout_keep(cx, offs_m, offs_n), dpd / (1.0 - cx.dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    if MASKED and F.guard:  # 0 * NaN where an unseen value is non-finite (dpd = dO @ V^T)
        ds = tl.where(s == float("-inf"), 0.0, ds)
    if F.softcap:
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _row_stats(stats, offs_m, q_len):
    """``lse2`` and ``delta`` of query rows ``offs_m``; ``stats`` points both at the head's first row."""
    lse2_ptr, delta_ptr = stats
    lse2 = tl.load(lse2_ptr + offs_m, mask=offs_m < q_len, other=float("inf"))
    return lse2, tl.load(delta_ptr + offs_m, mask=offs_m < q_len, other=0.0)


@triton.jit
def _dkdv_step(dk, dv, k, v, qdo, stats, start_m, start_n, cx, F: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """dk/dv contribution of the query tile at ``start_m`` of one q head to the key block at ``start_n``."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    q = load_tile(qdo[0], offs_m, tl.arange(0, F.block_d), cx.q_len, F.d)
    do = load_tile(qdo[1], offs_m, tl.arange(0, F.block_dv), cx.q_len, F.dv)
    lse2, delta = _row_stats(stats, offs_m, cx.q_len)
    if F.alibi_keys:  # the scores of this tile exceed the logits by the row term: so must the lse they meet
        lse2 += alibi_row_term(offs_m, cx.slope)
    s, t = _scores(q, k, offs_m, start_n, cx, F, BLOCK_N, MASKED, True)
    p, pd = _probs(s, lse2, offs_m, offs_n, cx, F, MASKED)
    dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=F.precision)  # [BN,BM]@[BM,DV]
    dpd = tl.dot(do, tl.trans(v), input_precision=F.precision)  # [BM,DV]@[DV,BN]
    ds = _dscores(p, dpd, delta, s, t, offs_m, offs_n, cx, F, MASKED)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=F.precision)  # [BN,BM]@[BM,D]
    return dk, dv


@triton.jit
def _dkdv_blocks(dk, dv, k, v, qdo, stats, start, end, index, start_n, cx, F: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """dk/dv contributions of query tiles ``[start, end)`` of one q head to one key block; with ``F.sparse``
    of the ``end`` layout query blocks listed at ``index``."""
    if F.sparse:
        for j in range(0, end * (F.layout_bq // BLOCK_M)):
            dk, dv = _dkdv_step(dk, dv, k, v, qdo, stats, _listed_start(index, j, F.layout_bq, BLOCK_M), start_n,
                                cx, F, BLOCK_M, BLOCK_N, MASKED)
    else:
        for start_m in range(start, end, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, qdo, stats, start_m, start_n, cx, F, BLOCK_M, BLOCK_N, MASKED)
    return dk, dv


@triton.jit
def flash_bwd_delta_kernel(O, DO, DELTA, T_Q, H, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``delta = rowsum(dO * O)`` in float32 into ``DELTA (B, H, T_Q)`` contiguous, reading the ``(B, T, H, DV)``
    tensors ``O``, ``DO`` (``(tensor, *strides)``) once: the softmax gradient's correction term per query row."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    first = tl.zeros((), tl.int64)
    o = load_tile(head_view(O, b, h, first), offs_m, offs_dv, T_Q, DV).to(tl.float32)
    do = load_tile(head_view(DO, b, h, first), offs_m, offs_dv, T_Q, DV).to(tl.float32)
    tl.store(DELTA + (b * H + h) * T_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < T_Q)


@triton.heuristics(dict(F=flags))
@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV_, KPM, AM, ALIBI, CU, LISTS, T_Q, T_K, H, HKV, GROUP, S,
    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    F: tl.constexpr,
):
    # one program holds BLOCK_N keys of one k/v head and streams the queries of all its q heads,
    # so dk/dv are accumulated in registers without atomics. LISTS is the transposed layout: per key
    # block, the query blocks that listed it. Arguments as in flash_fwd_kernel; DV_ is the dv output.
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    q_start, k_start, q_len, k_len = _seq_bounds(CU, b, T_Q, T_K, F)
    if start_n >= k_len:
        return
    bm = _batch_row(b, F)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, F.block_d)
    offs_dv = tl.arange(0, F.block_dv)
    k = load_tile(head_view(K, bm, hk, k_start), offs_n, offs_d, k_len, F.d)
    v = load_tile(head_view(V, bm, hk, k_start), offs_n, offs_dv, k_len, F.dv)
    dk = tl.zeros([BLOCK_N, F.block_d], tl.float32)
    dv = tl.zeros([BLOCK_N, F.block_dv], tl.float32)
    # the band of this key block is the same for every q head of the group
    cx = make_ctx(KPM, AM, S, bm, hk, q_start, k_start, q_len, k_len, 0, 0.0, F)
    lo, f_lo, f_hi, hi = _query_blocks(start_n, cx, F, BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        cx = make_ctx(KPM, AM, S, bm, h, q_start, k_start, q_len, k_len, b * H + h, alibi_slope(ALIBI, b, h, F), F)
        qdo = (head_view(Q, bm, h, q_start), head_view(DO, bm, h, q_start))
        row = (bm * H + h) * T_Q + q_start
        stats = (LSE2 + row, DELTA + row)
        if F.sparse:
            n_masked, masked, n_full, full = _lists(LISTS, b, h, H, start_n // LAYOUT_BK)
            dk, dv = _dkdv_blocks(dk, dv, k, v, qdo, stats, 0, n_masked, masked, start_n, cx, F, BLOCK_M, BLOCK_N, True)
            dk, dv = _dkdv_blocks(dk, dv, k, v, qdo, stats, 0, n_full, full, start_n, cx, F, BLOCK_M, BLOCK_N, False)
        else:
            # masked edge, unmasked interior, masked diagonal / window edge
            dk, dv = _dkdv_blocks(dk, dv, k, v, qdo, stats, lo, f_lo, None, start_n, cx, F, BLOCK_M, BLOCK_N, True)
            dk, dv = _dkdv_blocks(dk, dv, k, v, qdo, stats, f_lo, f_hi, None, start_n, cx, F, BLOCK_M, BLOCK_N, False)
            dk, dv = _dkdv_blocks(dk, dv, k, v, qdo, stats, f_hi, hi, None, start_n, cx, F, BLOCK_M, BLOCK_N, True)
    store_tile(head_view(DK, bm, hk, k_start), offs_n, offs_d, dk * (S.qk_scale / LOG2E), k_len, F.d)
    store_tile(head_view(DV_, bm, hk, k_start), offs_n, offs_dv, dv, k_len, F.dv)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, kv, start_n, offs_m, cx, F: tl.constexpr, BLOCK_N: tl.constexpr,
             MASKED: tl.constexpr):
    """dq contribution of the key tile at ``start_n`` to one query block."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(kv[0], offs_n, tl.arange(0, F.block_d), cx.k_len, F.d)
    v = load_tile(kv[1], offs_n, tl.arange(0, F.block_dv), cx.k_len, F.dv)
    s, t = _scores(q, k, offs_m, start_n, cx, F, BLOCK_N, MASKED, False)
    p, _ = _probs(s, lse2, offs_m, offs_n, cx, F, MASKED)
    dpd = tl.dot(do, tl.trans(v), input_precision=F.precision)  # [BM,DV]@[DV,BN]
    ds = _dscores(p, dpd, delta, s, t, offs_m, offs_n, cx, F, MASKED)
    if MASKED and F.guard:  # ds = 0 at an unseen key, but 0 * NaN in dS @ K
        k = finite_values(k)[0]
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=F.precision)  # [BM,BN]@[BN,D]


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, kv, start, end, index, offs_m, cx, F: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """dq contribution of key tiles ``[start, end)`` to one query block; with ``F.sparse`` of the ``end``
    layout key blocks listed at ``index``."""
    if F.sparse:
        for j in range(0, end * (F.layout_bk // BLOCK_N)):
            dq = _dq_step(dq, q, do, lse2, delta, kv, _listed_start(index, j, F.layout_bk, BLOCK_N), offs_m, cx, F,
                          BLOCK_N, MASKED)
    else:
        for start_n in range(start, end, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, kv, start_n, offs_m, cx, F, BLOCK_N, MASKED)
    return dq


@triton.heuristics(dict(F=flags))
@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, KPM, AM, ALIBI, CU, LISTS, T_Q, T_K, H, GROUP, S,
    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    F: tl.constexpr,
):
    cx, b, h, bm, q_start, k_start, start_m = _query_program(KPM, AM, ALIBI, CU, S, T_Q, T_K, H, F, BLOCK_M)
    if start_m >= cx.q_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, F.block_d)
    q = load_tile(head_view(Q, bm, h, q_start), offs_m, offs_d, cx.q_len, F.d)
    do = load_tile(head_view(DO, bm, h, q_start), offs_m, tl.arange(0, F.block_dv), cx.q_len, F.dv)
    row = (bm * H + h) * T_Q + q_start
    lse2, delta = _row_stats((LSE2 + row, DELTA + row), offs_m, cx.q_len)
    if F.alibi_keys:  # as in _dkdv_step
        lse2 += alibi_row_term(offs_m, cx.slope)
    kv = (head_view(K, bm, h // GROUP, k_start), head_view(V, bm, h // GROUP, k_start))
    dq = tl.zeros([BLOCK_M, F.block_d], tl.float32)
    if F.sparse:
        n_masked, masked, n_full, full = _lists(LISTS, b, h, H, start_m // LAYOUT_BQ)
        dq = _dq_blocks(dq, q, do, lse2, delta, kv, 0, n_masked, masked, offs_m, cx, F, BLOCK_N, True)
        dq = _dq_blocks(dq, q, do, lse2, delta, kv, 0, n_full, full, offs_m, cx, F, BLOCK_N, False)
    else:
        first = start_m + cx.k_len - cx.q_len  # bottom-right alignment
        lo, f_lo, f_hi, hi = key_blocks(first, first + BLOCK_M, cx, F, BLOCK_N)
        # masked window edge, unmasked interior, masked diagonal / ragged end
        dq = _dq_blocks(dq, q, do, lse2, delta, kv, lo, f_lo, None, offs_m, cx, F, BLOCK_N, True)
        dq = _dq_blocks(dq, q, do, lse2, delta, kv, f_lo, f_hi, None, offs_m, cx, F, BLOCK_N, False)
        dq = _dq_blocks(dq, q, do, lse2, delta, kv, f_hi, hi, None, offs_m, cx, F, BLOCK_N, True)
    store_tile(head_view(DQ, bm, h, q_start), offs_m, offs_d, dq * (cx.qk_scale / LOG2E), cx.q_len, F.d)


@triton.jit
def _decode_tile(acc, l_i, m_i, q, k_view, v_view, start_n, i, qp, offs_r, offs_d, offs_dv, slope, am_rows, hi, T_Q,
                 T_K, GROUP, cx, F: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the split-KV decode loop (``MASKED=False``: every row sees every key of the tile; the
    block's padding rows, past ``GROUP * T_Q``, compute on zero queries and are never read)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        k = load_tile(k_view, offs_n, offs_d, hi, F.d)
    else:  # every row of the tile exists: no row bound
        k = tl.load(tile_ptrs(k_view, offs_n, offs_d), mask=offs_d[None, :] < F.d, other=0.0)
    s, _ = logits(q, k, cx, F)  # [BM, D] @ [D, BN] -> [BM, BN]
    if F.alibi_keys:  # one FMA per score (the rows' own slopes); the row term leaves the lse below
        s = s + alibi_key_term(i, offs_n, T_K - T_Q, slope[:, None])
    elif F.alibi:
        s = alibi_bias(s, qp, start_n, BLOCK_N, slope[:, None], False)
    if MASKED:
        s = tl.where(visible(qp[:, None], offs_n, offs_r, GROUP * T_Q, hi, am_rows, cx, F), s, float("-inf"))
    p, alpha, l_i, m_i = online_softmax(s, m_i, l_i, MASKED)
    if MASKED:
        v, bad = finite_values(load_tile(v_view, offs_n, offs_dv, hi, F.dv))
        acc = poison_seen(acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=F.precision), s, bad)
    else:
        v = tl.load(tile_ptrs(v_view, offs_n, offs_dv), mask=offs_dv[None, :] < F.dv, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=F.precision)
    return acc, l_i, m_i


@triton.heuristics(dict(F=flags))
@triton.jit
def flash_decode_kernel(
    Q, K, V, OPART, LSEPART, KPM, AM, ALIBI, T_Q, T_K, HKV, GROUP, SPLIT_LEN, S,
    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, F: tl.constexpr,
):
    # Split-KV for few queries: one program takes SPLIT_LEN keys of one k/v head and all GROUP * T_Q
    # query rows that read it (row r = query head g * T_Q + query i), so K/V are read once per split and
    # a single query row still spreads over the whole GPU. Partial results are merged by their lse.
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    offs_r = tl.arange(0, BLOCK_M)
    h = hk * GROUP + offs_r // T_Q
    i = offs_r % T_Q
    offs_d = tl.arange(0, F.block_d)
    offs_dv = tl.arange(0, F.block_dv)
    q_ptr, q_b, q_t, q_h, q_d = Q
    q = tl.load(q_ptr + b * q_b + h[:, None].to(tl.int64) * q_h + i[:, None].to(tl.int64) * q_t
                + offs_d[None, :] * q_d, mask=(offs_r[:, None] < GROUP * T_Q) & (offs_d[None, :] < F.d), other=0.0)
    # the dense mask's rows are (head, query) pairs here: its context starts at the batch row only
    cx = make_ctx(KPM, AM, S, b, hk * 0, 0, 0, T_Q, T_K, 0, 0.0, F)
    slope = 0.0  # ALiBi: one slope per row (the rows are (head, query) pairs)
    if F.alibi:
        slope = tl.load(ALIBI[0] + b * ALIBI[1] + h, mask=offs_r < GROUP * T_Q, other=0.0).to(tl.float32)
    am_rows = i.to(tl.int64)
    if F.am:
        am_rows = h.to(tl.int64) * AM[2] + i.to(tl.int64) * AM[3]
    qp = i + (T_K - T_Q)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, F.block_dv], tl.float32)
    k_view = head_view(K, b, hk, 0)
    v_view = head_view(V, b, hk, 0)
    # the keys the queries may see, in masked / unmasked / masked ranges as the forward takes them (the unmasked
    # ones every row sees whole: no mask arithmetic and no NaN guard, which changes nothing at a key every row
    # sees), cut to this split; only the batch row's visible span is read (a static cache's empty tail, padding)
    lo, f_lo, f_hi, hi = key_blocks(T_K - T_Q, T_K, cx, F, BLOCK_N)
    lo = tl.maximum(lo, split * SPLIT_LEN)
    hi = tl.minimum(hi, split * SPLIT_LEN + SPLIT_LEN)
    f_lo = tl.minimum(tl.maximum(f_lo, lo), hi)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), hi)
    for start_n in range(lo, f_lo, BLOCK_N):
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, k_view, v_view, start_n, i, qp, offs_r, offs_d, offs_dv, slope,
                                     am_rows, hi, T_Q, T_K, GROUP, cx, F, BLOCK_N, True)
    for start_n in range(f_lo, f_hi, BLOCK_N):
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, k_view, v_view, start_n, i, qp, offs_r, offs_d, offs_dv, slope,
                                     am_rows, hi, T_Q, T_K, GROUP, cx, F, BLOCK_N, False)
    for start_n in range(f_hi, hi, BLOCK_N):
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, k_view, v_view, start_n, i, qp, offs_r, offs_d, offs_dv, slope,
                                     am_rows, hi, T_Q, T_K, GROUP, cx, F, BLOCK_N, True)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    # partials: (B * HKV, SPLITS, BLOCK_M, DV) and (B * HKV, SPLITS, BLOCK_M), contiguous
    part = (bhk.to(tl.int64) * tl.num_programs(0) + split) * BLOCK_M
    tl.store(OPART + (part + offs_r[:, None]) * DV + offs_dv[None, :], out, mask=offs_dv[None, :] < DV)
    if F.alibi_keys:  # the scores exceed the logits by the row term: the lse must not
        m_i = m_i - alibi_row_term(i, slope)
    tl.store(LSEPART + part + offs_r, natural_lse(m_i, l_i))


@triton.heuristics(dict(HAS_SINKS=lambda args: args["SINKS"] is not None))
@triton.jit
def flash_decode_combine_kernel(
    OPART, LSEPART, SINKS, O, LSE, T_Q, H, HKV, GROUP, SPLITS, ROWS: tl.constexpr, DV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """Merge the split-KV partials of one query row by their lse; apply the sink; write out and lse."""
    pid = tl.program_id(0)
    bhk = pid // (GROUP * T_Q)
    r = pid % (GROUP * T_Q)
    b = (bhk // HKV).to(tl.int64)
    h = (bhk % HKV) * GROUP + r // T_Q
    i = r % T_Q
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    part = (bhk.to(tl.int64) * SPLITS + offs_s) * ROWS + r
    lse_s = tl.load(LSEPART + part, mask=offs_s < SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    tot = tl.sum(w, 0)
    o = tl.load(OPART + part[:, None] * DV + offs_dv[None, :],
                mask=(offs_s[:, None] < SPLITS) & (offs_dv[None, :] < DV), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(tot > 0, tot, 1.0)
    lse = tl.where(tot > 0, m_safe + tl.log(tl.where(tot > 0, tot, 1.0)), float("-inf"))
    if HAS_SINKS:
        # the sink joins the denominator: scale by sum / (sum + e^sink)
        out = out / (1.0 + tl.exp(tl.load(SINKS + h).to(tl.float32) - lse))
    o_view = head_view(O, b, h, i.to(tl.int64))
    tl.store(o_view.ptr + offs_dv * o_view.col, out.to(o_view.ptr.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSE + (b * H + h) * T_Q + i, lse)
