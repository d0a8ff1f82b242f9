"""Dense flash attention in Triton: forward (with log-sum-exp), backward (dk/dv, then dq).

Layout ``(B, T, H, D)`` with arbitrary strides; GQA is native (a query head reads k/v head
``h // GROUP``). Scores live in the log2 domain (``exp2``) with the scale folded in. Masks follow
``hf_ahfa.masks``: bottom-right causal, window ``(left, right)``, key padding, dense boolean mask,
packed sequences (``cu_seqlens``). Blocks outside the causal/window band are never visited.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    # no tanh in triton.language that also runs under TRITON_INTERPRET. 2 * sigmoid(2x) - 1 cancels for small x
    # (a large softcap): an odd series below |x| = 0.2 (next term < 6e-8 relative), (1 - e) / (1 + e) with
    # e = exp(-2|x|) above (no overflow, at most ~2 ulp lost)
    a = tl.abs(x)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0.2, series, tl.where(x < 0, -big, big))


@triton.jit
def _seq_bounds(cu_q, cu_k, seq, Q, K, VARLEN: tl.constexpr):
    """Start row and length of sequence ``seq`` in q and in k (whole tensors when not packed)."""
    if VARLEN:
        q_start = tl.load(cu_q + seq).to(tl.int64)
        k_start = tl.load(cu_k + seq).to(tl.int64)
        q_len = (tl.load(cu_q + seq + 1) - q_start).to(tl.int32)
        k_len = (tl.load(cu_k + seq + 1) - k_start).to(tl.int32)
    else:
        q_start = tl.zeros((), tl.int64)
        k_start = tl.zeros((), tl.int64)
        q_len = Q
        k_len = K
    return q_start, k_start, q_len, k_len


@triton.jit
def _query_block(CUQ, CUK, Q, K, H, GROUP, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Which (sequence, q head, query block) this program of a query-block grid owns."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, k_start, q_len, k_len = _seq_bounds(CUQ, CUK, b, Q, K, VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if CAUSAL:
        # the last query blocks see the most keys: start them first so the tail of the grid is short
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bm = b.to(tl.int64)
    if VARLEN:
        bm = bm * 0  # packed sequences share batch row 0
    return bh, b, h, h // GROUP, bm, q_start, k_start, q_len, k_len, start_m


@triton.jit
def _key_range(start_m, q_len, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WIN_LEFT, WIN_RIGHT, HAS_WINDOW: tl.constexpr):
    """Key blocks ``[lo, hi)`` that queries ``start_m .. start_m + BLOCK_M`` may see."""
    shift = k_len - q_len  # bottom-right alignment: query i sits at position i + shift
    lo = 0
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + shift)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m + shift - WIN_LEFT)
        lo = (lo // BLOCK_N) * BLOCK_N
        if not CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M - 1 + shift + WIN_RIGHT + 1)
    return lo, tl.maximum(hi, 0)


@triton.jit
def _query_range(start_n, q_len, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, WIN_LEFT, WIN_RIGHT, HAS_WINDOW: tl.constexpr):
    """Query blocks ``[lo, hi)`` that may see keys ``start_n .. start_n + BLOCK_N``."""
    shift = k_len - q_len
    lo = 0
    hi = q_len
    if CAUSAL:
        lo = tl.maximum(0, start_n - shift)
    if HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 + WIN_LEFT - shift + 1)
        if not CAUSAL:
            lo = tl.maximum(0, start_n - WIN_RIGHT - shift)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, tl.maximum(hi, 0)


@triton.jit
def _full_range(start_m, lo, hi, q_len, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, WIN_LEFT, WIN_RIGHT, HAS_WINDOW: tl.constexpr, ELEMENT_MASKS: tl.constexpr):
    """Key blocks ``[f_lo, f_hi)`` inside ``[lo, hi)`` that every query of the block fully sees.

    Only the blocks outside it (the causal diagonal, window edges, the ragged end) need a mask. With a
    key-padding or dense mask (``ELEMENT_MASKS``) every block is masked.
    """
    shift = k_len - q_len
    f_hi = (k_len // BLOCK_N) * BLOCK_N
    f_lo = lo
    if CAUSAL:
        f_hi = tl.minimum(f_hi, ((start_m + shift + 1) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:
        f_lo = tl.maximum(lo, tl.cdiv(start_m + BLOCK_M - 1 + shift - WIN_LEFT, BLOCK_N) * BLOCK_N)
        if not CAUSAL:
            f_hi = tl.minimum(f_hi, ((start_m + shift + WIN_RIGHT + 1) // BLOCK_N) * BLOCK_N)
    if ELEMENT_MASKS:
        f_lo = hi
    f_lo = tl.minimum(tl.maximum(f_lo, lo), hi)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), hi)
    return f_lo, f_hi


@triton.jit
def _full_query_range(start_n, lo, hi, q_len, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, WIN_LEFT, WIN_RIGHT, HAS_WINDOW: tl.constexpr,
                      ELEMENT_MASKS: tl.constexpr):
    """Query blocks ``[f_lo, f_hi)`` inside ``[lo, hi)`` that fully see keys ``start_n .. + BLOCK_N``."""
    shift = k_len - q_len
    f_lo = lo
    f_hi = hi
    if CAUSAL:
        f_lo = tl.maximum(f_lo, tl.cdiv(start_n + BLOCK_N - 1 - shift, BLOCK_M) * BLOCK_M)
    if HAS_WINDOW:
        f_hi = tl.minimum(f_hi, ((start_n + WIN_LEFT - shift + 1) // BLOCK_M) * BLOCK_M)
        if not CAUSAL:
            f_lo = tl.maximum(f_lo, tl.cdiv(start_n + BLOCK_N - 1 - shift - WIN_RIGHT, BLOCK_M) * BLOCK_M)
    if ELEMENT_MASKS or start_n + BLOCK_N > k_len:  # a ragged key block is masked everywhere
        f_lo = hi
    f_lo = tl.minimum(tl.maximum(f_lo, lo), hi)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), hi)
    return f_lo, f_hi


@triton.jit
def _scores(q, k, offs_m, offs_n, q_len, k_len, qk_scale, softcap,
            kpm_ptr, stride_kpm_k, kpm_off, am_ptr, stride_am_q, stride_am_k, am_off,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, WIN_LEFT, WIN_RIGHT,
            SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr,
            PRECISION: tl.constexpr, MASKED: tl.constexpr = True):
    """Scores of one tile in the log2 domain, and the raw tanh for the softcap gradient.

    q: [BM, D], k: [BN, D] -> s: [BM, BN]; invisible entries are -inf. ``MASKED=False`` is for tiles
    that lie wholly inside the visible band (see ``_full_range``): no mask is built at all.
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BM, D] @ [D, BN] -> [BM, BN]
    t = s
    if SOFTCAP:
        t = _tanh(s * (qk_scale / LOG2E) / softcap)
        s = t * (softcap * LOG2E)
    else:
        s = s * qk_scale
    if not MASKED:
        return s, t
    qp = offs_m[:, None] + (k_len - q_len)
    kp = offs_n[None, :]
    ok = (offs_m[:, None] < q_len) & (kp < k_len)
    if CAUSAL:
        ok = ok & (kp <= qp)
    if HAS_WINDOW:
        ok = ok & (kp >= qp - WIN_LEFT) & (kp <= qp + WIN_RIGHT)
    if HAS_KPM:
        pad = tl.load(kpm_ptr + kpm_off + offs_n.to(tl.int64) * stride_kpm_k, mask=offs_n < k_len, other=0)
        ok = ok & (pad != 0)[None, :]
    if HAS_AM:
        am = tl.load(
            am_ptr + am_off + offs_m[:, None].to(tl.int64) * stride_am_q + offs_n[None, :].to(tl.int64) * stride_am_k,
            mask=(offs_m[:, None] < q_len) & (offs_n[None, :] < k_len), other=0,
        )
        ok = ok & (am != 0)
    return tl.where(ok, s, float("-inf")), t


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, k_len, DROPOUT_P):
    # one Philox stream per (batch, head); the offset numbers each (query, key) pair of that head
    rnd = tl.rand(seed + bh, offs_m[:, None] * k_len + offs_n[None, :])
    return rnd >= DROPOUT_P


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_d, offs_dv, q_len, k_len, qk_scale, softcap,
              KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
              WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D: tl.constexpr, DV: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
              HAS_AM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr):
    """Online-softmax update of one query block with the key tile at ``start_n``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < k_len
    if not MASKED:
        n_ok = offs_n >= 0  # unmasked tiles lie below k_len: let the compiler drop the bound check
    k = tl.load(k_ptrs, mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    s, _ = _scores(q, k, offs_m, offs_n, q_len, k_len, qk_scale, softcap,
                   KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                   CAUSAL, HAS_WINDOW, WIN_LEFT, WIN_RIGHT, SOFTCAP, HAS_KPM, HAS_AM, PRECISION, MASKED)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new  # a fully visible tile gives every row a finite max
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, offs_n, k_len, DROPOUT_P)
        p = tl.where(keep, p / (1.0 - DROPOUT_P), 0.0)
    v = tl.load(v_ptrs, mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # [BM,BN]@[BN,DV]
    return acc, l_i, m_new


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, start, end, offs_m, offs_d, offs_dv,
               stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
               KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
               WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D: tl.constexpr, DV: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
               HAS_AM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr):
    """Online-softmax accumulation over key blocks ``[start, end)`` of one query block."""
    # pointers advance by one block per step instead of being recomputed in 64-bit per element
    offs_n = start + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_dv[None, :] * stride_vd
    for start_n in range(start, end, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_d, offs_dv, q_len, k_len,
                                  qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k,
                                  am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW,
                                  SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, MASKED)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit
def _fwd_listed(acc, l_i, m_i, q, k_base, v_base, idx_ptr, count, offs_m, offs_d, offs_dv,
                stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
                KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D: tl.constexpr, DV: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                HAS_AM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                LAYOUT_BK: tl.constexpr, MASKED: tl.constexpr):
    """The same over the ``count`` layout key blocks listed at ``idx_ptr`` (block-sparse path).

    One flat loop over (listed block, tile of it), so the compiler pipelines the loads across blocks.
    """
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    for j in range(0, count * SUB):
        start_n = tl.load(idx_ptr + j // SUB) * LAYOUT_BK + (j % SUB) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_dv[None, :] * stride_vd
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_d, offs_dv, q_len, k_len,
                                  qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k,
                                  am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW,
                                  SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, MASKED)
    return acc, l_i, m_i


@triton.jit
def flash_fwd_kernel(
    Qp, Kp, Vp, Op, LSEp, SINKp, KPMp, AMp, CUQ, CUK, PCNTp, PIDXp, FCNTp, FIDXp, LROWS, LSLOTS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_kpm_b, stride_kpm_k,
    stride_am_b, stride_am_h, stride_am_q, stride_am_k,
    Q, K, H, GROUP, D: tl.constexpr, DV: tl.constexpr,
    qk_scale, softcap, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, SPARSE: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # SPARSE: only the key blocks a block-sparse layout lists for this query block (hf_ahfa.block_layout):
    # PCNT/PIDX (B, H, LROWS[, LSLOTS]) the blocks that need the element mask, FCNT/FIDX those that do not.
    bh, b, h, hk, bm, q_start, k_start, q_len, k_len, start_m = _query_block(CUQ, CUK, Q, K, H, GROUP, CAUSAL,
                                                                              VARLEN, BLOCK_M)
    if start_m >= q_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        Qp + bm * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D), other=0.0,
    )
    k_base = Kp + bm * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kt
    v_base = Vp + bm * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vt
    kpm_off = bm * stride_kpm_b + k_start * stride_kpm_k
    am_off = bm * stride_am_b + h.to(tl.int64) * stride_am_h + q_start * stride_am_q + k_start * stride_am_k

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if SPARSE:
        lrow = (b.to(tl.int64) * H + h) * LROWS + start_m // LAYOUT_BQ
        acc, l_i, m_i = _fwd_listed(acc, l_i, m_i, q, k_base, v_base, PIDXp + lrow * LSLOTS, tl.load(PCNTp + lrow),
                                    offs_m, offs_d, offs_dv, stride_kt, stride_kd, stride_vt, stride_vd, q_len,
                                    k_len, qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q,
                                    stride_am_k, am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL,
                                    HAS_WINDOW, SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, LAYOUT_BK,
                                    True)
        acc, l_i, m_i = _fwd_listed(acc, l_i, m_i, q, k_base, v_base, FIDXp + lrow * LSLOTS, tl.load(FCNTp + lrow),
                                    offs_m, offs_d, offs_dv, stride_kt, stride_kd, stride_vt, stride_vd, q_len,
                                    k_len, qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q,
                                    stride_am_k, am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL,
                                    HAS_WINDOW, SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, LAYOUT_BK,
                                    False)
    else:
        lo, hi = _key_range(start_m, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL, WIN_LEFT, WIN_RIGHT, HAS_WINDOW)
        f_lo, f_hi = _full_range(start_m, lo, hi, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL, WIN_LEFT, WIN_RIGHT,
                                 HAS_WINDOW, HAS_KPM or HAS_AM)
        # masked window edge, unmasked interior, masked diagonal / ragged end
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, lo, f_lo, offs_m, offs_d, offs_dv,
                                   stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
                                   KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                                   WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW, SOFTCAP,
                                   HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, True)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, f_lo, f_hi, offs_m, offs_d, offs_dv,
                                   stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
                                   KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                                   WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW, SOFTCAP,
                                   HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, False)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, f_hi, hi, offs_m, offs_d, offs_dv,
                                   stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
                                   KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                                   WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW, SOFTCAP,
                                   HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, True)

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    den = l_i
    if HAS_SINKS:
        den = den + tl.exp2(tl.load(SINKp + h).to(tl.float32) * LOG2E - m_safe)
    out = acc / tl.where(den > 0, den, 1.0)[:, None]  # a row that sees nothing stays 0
    tl.store(
        Op + bm * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_ot + offs_dv[None, :] * stride_od,
        out.to(Op.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < DV),
    )
    lse = tl.where(l_i > 0, (m_safe + tl.log2(tl.where(l_i > 0, l_i, 1.0))) / LOG2E, float("-inf"))
    # lse is (B, H, Q) contiguous; packed sequences index it by their global row
    tl.store(LSEp + (bm * H + h) * Q + rows, lse, mask=offs_m < q_len)


@triton.jit
def _probs(s, lse2, offs_m, offs_n, seed, bh, k_len, DROPOUT: tl.constexpr, DROPOUT_P):
    """Recomputed probabilities ``p`` and their dropped-out version ``pd`` (``p`` when no dropout)."""
    p = tl.exp2(s - lse2[:, None])  # lse2 = +inf for rows that see nothing: p = 0
    pd = p
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, offs_n, k_len, DROPOUT_P)
        pd = tl.where(keep, p / (1.0 - DROPOUT_P), 0.0)
    return p, pd


@triton.jit
def _dscores(p, dpd, delta, t, offs_m, offs_n, seed, bh, k_len,
             SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DROPOUT_P):
    """Gradient w.r.t. the raw scores q.k (before scale and softcap). dpd = dO @ V^T: [BM, BN]."""
    dp = dpd
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, offs_n, k_len, DROPOUT_P)
        dp = tl.where(keep, dpd / (1.0 - DROPOUT_P), 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, row_base, start_m, offs_n, offs_d, offs_dv,
               stride_qt, stride_qd, stride_dot, stride_dod, LSE2p, DELTAp, q_len, k_len,
               qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k,
               am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D: tl.constexpr, DV: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
               HAS_AM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               MASKED: tl.constexpr):
    """dk/dv contribution of the query tile at ``start_m`` of one q head to one key block."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dot + offs_dv[None, :] * stride_dod,
                 mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < DV), other=0.0)
    lse2 = tl.load(LSE2p + row_base + offs_m, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(DELTAp + row_base + offs_m, mask=offs_m < q_len, other=0.0)
    s, t = _scores(q, k, offs_m, offs_n, q_len, k_len, qk_scale, softcap,
                   KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                   CAUSAL, HAS_WINDOW, WIN_LEFT, WIN_RIGHT, SOFTCAP, HAS_KPM, HAS_AM, PRECISION, MASKED)
    p, pd = _probs(s, lse2, offs_m, offs_n, seed, bh, k_len, DROPOUT, DROPOUT_P)
    dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PRECISION)  # [BN,BM]@[BM,DV]
    dpd = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM,DV]@[DV,BN]
    ds = _dscores(p, dpd, delta, t, offs_m, offs_n, seed, bh, k_len, SOFTCAP, DROPOUT, DROPOUT_P)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)  # [BN,BM]@[BM,D]
    return dk, dv


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, row_base, start, end, offs_n, offs_d, offs_dv,
                stride_qt, stride_qd, stride_dot, stride_dod, LSE2p, DELTAp, q_len, k_len,
                qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k,
                am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D: tl.constexpr, DV: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                HAS_AM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr):
    """dk/dv contributions of query blocks ``[start, end)`` of one q head to one key block."""
    for start_m in range(start, end, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, row_base, start_m, offs_n, offs_d, offs_dv,
                            stride_qt, stride_qd, stride_dot, stride_dod, LSE2p, DELTAp, q_len, k_len,
                            qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k,
                            am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW,
                            SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_M, MASKED)
    return dk, dv


@triton.jit
def _dkdv_listed(dk, dv, k, v, q_base, do_base, row_base, idx_ptr, count, offs_n, offs_d, offs_dv,
                 stride_qt, stride_qd, stride_dot, stride_dod, LSE2p, DELTAp, q_len, k_len,
                 qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k,
                 am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D: tl.constexpr, DV: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                 HAS_AM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 LAYOUT_BQ: tl.constexpr, MASKED: tl.constexpr):
    """The same over the ``count`` layout query blocks listed at ``idx_ptr`` (block-sparse path)."""
    SUB: tl.constexpr = LAYOUT_BQ // BLOCK_M
    for j in range(0, count * SUB):
        start_m = tl.load(idx_ptr + j // SUB) * LAYOUT_BQ + (j % SUB) * BLOCK_M
        dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, row_base, start_m, offs_n, offs_d, offs_dv,
                            stride_qt, stride_qd, stride_dot, stride_dod, LSE2p, DELTAp, q_len, k_len,
                            qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k,
                            am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW,
                            SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_M, MASKED)
    return dk, dv


@triton.jit
def flash_bwd_dkdv_kernel(
    Qp, Kp, Vp, DOp, LSE2p, DELTAp, DKp, DVp, KPMp, AMp, CUQ, CUK, PCNTp, PIDXp, FCNTp, FIDXp, LROWS, LSLOTS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    stride_kpm_b, stride_kpm_k,
    stride_am_b, stride_am_h, stride_am_q, stride_am_k,
    Q, K, H, HKV, GROUP, D: tl.constexpr, DV: tl.constexpr,
    qk_scale, softcap, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, SPARSE: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # one program holds BLOCK_N keys of one k/v head and streams the queries of all its q heads,
    # so dk/dv are accumulated in registers without atomics
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    q_start, k_start, q_len, k_len = _seq_bounds(CUQ, CUK, b, Q, K, VARLEN)
    if start_n >= k_len:
        return
    bm = b.to(tl.int64)
    if VARLEN:
        bm = bm * 0

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = (k_start + offs_n).to(tl.int64)
    k = tl.load(Kp + bm * stride_kb + hk.to(tl.int64) * stride_kh + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=(offs_n[:, None] < k_len) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(Vp + bm * stride_vb + hk.to(tl.int64) * stride_vh + cols[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < k_len) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    kpm_off = bm * stride_kpm_b + k_start * stride_kpm_k
    lo, hi = _query_range(start_n, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL, WIN_LEFT, WIN_RIGHT, HAS_WINDOW)
    f_lo, f_hi = _full_query_range(start_n, lo, hi, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL, WIN_LEFT, WIN_RIGHT,
                                   HAS_WINDOW, HAS_KPM or HAS_AM)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Qp + bm * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qt
        do_base = DOp + bm * stride_dob + h.to(tl.int64) * stride_doh + q_start * stride_dot
        row_base = (bm * H + h) * Q + q_start
        am_off = bm * stride_am_b + h.to(tl.int64) * stride_am_h + q_start * stride_am_q + k_start * stride_am_k
        if SPARSE:
            # the transposed layout: per key block, the query blocks that listed it
            lcol = (b.to(tl.int64) * H + h) * LROWS + start_n // LAYOUT_BK
            dk, dv = _dkdv_listed(dk, dv, k, v, q_base, do_base, row_base, PIDXp + lcol * LSLOTS, tl.load(PCNTp + lcol),
                                  offs_n, offs_d, offs_dv, stride_qt, stride_qd, stride_dot, stride_dod, LSE2p,
                                  DELTAp, q_len, k_len, qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp,
                                  stride_am_q, stride_am_k, am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV,
                                  CAUSAL, HAS_WINDOW, SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_M,
                                  LAYOUT_BQ, True)
            dk, dv = _dkdv_listed(dk, dv, k, v, q_base, do_base, row_base, FIDXp + lcol * LSLOTS, tl.load(FCNTp + lcol),
                                  offs_n, offs_d, offs_dv, stride_qt, stride_qd, stride_dot, stride_dod, LSE2p,
                                  DELTAp, q_len, k_len, qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp,
                                  stride_am_q, stride_am_k, am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV,
                                  CAUSAL, HAS_WINDOW, SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_M,
                                  LAYOUT_BQ, False)
        else:
            # masked edge
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, row_base, lo, f_lo, offs_n, offs_d, offs_dv,
                                     stride_qt, stride_qd, stride_dot, stride_dod, LSE2p, DELTAp, q_len, k_len,
                                     qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k,
                                     am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW,
                                     SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_M, True)
            # unmasked interior
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, row_base, f_lo, f_hi, offs_n, offs_d, offs_dv,
                                     stride_qt, stride_qd, stride_dot, stride_dod, LSE2p, DELTAp, q_len, k_len,
                                     qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k,
                                     am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW,
                                     SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_M, False)
            # masked diagonal / window edge
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, row_base, f_hi, hi, offs_n, offs_d, offs_dv,
                                     stride_qt, stride_qd, stride_dot, stride_dod, LSE2p, DELTAp, q_len, k_len,
                                     qk_scale, softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k,
                                     am_off, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW,
                                     SOFTCAP, HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_M, True)
    dk = dk * (qk_scale / LOG2E)
    tl.store(DKp + bm * stride_dkb + hk.to(tl.int64) * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DKp.dtype.element_ty), mask=(offs_n[:, None] < k_len) & (offs_d[None, :] < D))
    tl.store(DVp + bm * stride_dvb + hk.to(tl.int64) * stride_dvh + cols[:, None] * stride_dvt + offs_dv[None, :] * stride_dvd,
             dv.to(DVp.dtype.element_ty), mask=(offs_n[:, None] < k_len) & (offs_dv[None, :] < DV))


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_d, offs_dv,
              stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
              KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
              WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D: tl.constexpr, DV: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
              HAS_AM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr):
    """dq contribution of the key tile at ``start_n`` to one query block."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
                mask=(offs_n[:, None] < k_len) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < k_len) & (offs_dv[None, :] < DV), other=0.0)
    s, t = _scores(q, k, offs_m, offs_n, q_len, k_len, qk_scale, softcap,
                   KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                   CAUSAL, HAS_WINDOW, WIN_LEFT, WIN_RIGHT, SOFTCAP, HAS_KPM, HAS_AM, PRECISION, MASKED)
    p, _ = _probs(s, lse2, offs_m, offs_n, seed, bh, k_len, DROPOUT, DROPOUT_P)
    dpd = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM,DV]@[DV,BN]
    ds = _dscores(p, dpd, delta, t, offs_m, offs_n, seed, bh, k_len, SOFTCAP, DROPOUT, DROPOUT_P)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # [BM,BN]@[BN,D]


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, start, end, offs_m, offs_d, offs_dv,
              stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
              KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
              WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D: tl.constexpr, DV: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
              HAS_AM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr):
    """dq contribution of key blocks ``[start, end)`` to one query block."""
    for start_n in range(start, end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_d, offs_dv,
                      stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
                      KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                      WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW, SOFTCAP,
                      HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, MASKED)
    return dq


@triton.jit
def _dq_listed(dq, q, do, lse2, delta, k_base, v_base, idx_ptr, count, offs_m, offs_d, offs_dv,
              stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
              KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
              WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D: tl.constexpr, DV: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
              HAS_AM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
              LAYOUT_BK: tl.constexpr, MASKED: tl.constexpr):
    """The same over the ``count`` layout key blocks listed at ``idx_ptr`` (block-sparse path)."""
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    for j in range(0, count * SUB):
        start_n = tl.load(idx_ptr + j // SUB) * LAYOUT_BK + (j % SUB) * BLOCK_N
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_d, offs_dv,
                      stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
                      KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                      WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW, SOFTCAP,
                      HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, MASKED)
    return dq


@triton.jit
def flash_bwd_dq_kernel(
    Qp, Kp, Vp, DOp, LSE2p, DELTAp, DQp, KPMp, AMp, CUQ, CUK, PCNTp, PIDXp, FCNTp, FIDXp, LROWS, LSLOTS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_kpm_b, stride_kpm_k,
    stride_am_b, stride_am_h, stride_am_q, stride_am_k,
    Q, K, H, GROUP, D: tl.constexpr, DV: tl.constexpr,
    qk_scale, softcap, WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, SPARSE: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh, b, h, hk, bm, q_start, k_start, q_len, k_len, start_m = _query_block(CUQ, CUK, Q, K, H, GROUP, CAUSAL,
                                                                              VARLEN, BLOCK_M)
    if start_m >= q_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Qp + bm * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DOp + bm * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_dot + offs_dv[None, :] * stride_dod,
                 mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < DV), other=0.0)
    row_base = (bm * H + h) * Q
    lse2 = tl.load(LSE2p + row_base + rows, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(DELTAp + row_base + rows, mask=offs_m < q_len, other=0.0)
    k_base = Kp + bm * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kt
    v_base = Vp + bm * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vt
    kpm_off = bm * stride_kpm_b + k_start * stride_kpm_k
    am_off = bm * stride_am_b + h.to(tl.int64) * stride_am_h + q_start * stride_am_q + k_start * stride_am_k
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if SPARSE:
        lrow = (b.to(tl.int64) * H + h) * LROWS + start_m // LAYOUT_BQ
        dq = _dq_listed(dq, q, do, lse2, delta, k_base, v_base, PIDXp + lrow * LSLOTS, tl.load(PCNTp + lrow), offs_m,
                        offs_d, offs_dv, stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale,
                        softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off, WIN_LEFT,
                        WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_KPM, HAS_AM,
                        DROPOUT, PRECISION, BLOCK_N, LAYOUT_BK, True)
        dq = _dq_listed(dq, q, do, lse2, delta, k_base, v_base, FIDXp + lrow * LSLOTS, tl.load(FCNTp + lrow), offs_m,
                        offs_d, offs_dv, stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale,
                        softcap, KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off, WIN_LEFT,
                        WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_KPM, HAS_AM,
                        DROPOUT, PRECISION, BLOCK_N, LAYOUT_BK, False)
    else:
        lo, hi = _key_range(start_m, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL, WIN_LEFT, WIN_RIGHT, HAS_WINDOW)
        f_lo, f_hi = _full_range(start_m, lo, hi, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL, WIN_LEFT, WIN_RIGHT,
                                 HAS_WINDOW, HAS_KPM or HAS_AM)
        # masked window edge
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, lo, f_lo, offs_m, offs_d, offs_dv,
                           stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
                           KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                           WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW, SOFTCAP,
                           HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, True)
        # unmasked interior
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, f_lo, f_hi, offs_m, offs_d, offs_dv,
                           stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
                           KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                           WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW, SOFTCAP,
                           HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, False)
        # masked diagonal / ragged end
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, f_hi, hi, offs_m, offs_d, offs_dv,
                           stride_kt, stride_kd, stride_vt, stride_vd, q_len, k_len, qk_scale, softcap,
                           KPMp, stride_kpm_k, kpm_off, AMp, stride_am_q, stride_am_k, am_off,
                           WIN_LEFT, WIN_RIGHT, DROPOUT_P, seed, bh, D, DV, CAUSAL, HAS_WINDOW, SOFTCAP,
                           HAS_KPM, HAS_AM, DROPOUT, PRECISION, BLOCK_N, True)
    dq = dq * (qk_scale / LOG2E)
    tl.store(DQp + bm * stride_dqb + h.to(tl.int64) * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQp.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D))


@triton.jit
def flash_decode_kernel(
    Qp, Kp, Vp, OPARTp, LSEPARTp, KPMp, AMp,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_kpm_b, stride_kpm_k,
    stride_am_b, stride_am_h, stride_am_q, stride_am_k,
    Q, K, HKV, GROUP, D: tl.constexpr, DV: tl.constexpr, SPLIT_LEN,
    qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # Split-KV for few queries: one program takes SPLIT_LEN keys of one k/v head and all GROUP * Q
    # query rows that read it (row r = query head g * Q + query i), so K/V are read once per split and
    # a single query row still spreads over the whole GPU. Partial results are merged by their lse.
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    offs_r = tl.arange(0, BLOCK_M)
    g = offs_r // Q
    i = offs_r % Q
    h = hk * GROUP + g
    row_ok = offs_r < GROUP * Q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Qp + b * stride_qb + h[:, None].to(tl.int64) * stride_qh + i[:, None].to(tl.int64) * stride_qt
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    qp = i + (K - Q)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    k_base = Kp + b * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = Vp + b * stride_vb + hk.to(tl.int64) * stride_vh
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, K)
    if HAS_WINDOW:
        lo = tl.maximum(lo, ((K - Q - WIN_LEFT) // BLOCK_N) * BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BM, D] @ [D, BN] -> [BM, BN]
        if SOFTCAP:
            s = _tanh(s * (qk_scale / LOG2E) / softcap) * (softcap * LOG2E)
        else:
            s = s * qk_scale
        ok = row_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= qp[:, None])
        if HAS_WINDOW:
            ok = ok & (offs_n[None, :] >= qp[:, None] - WIN_LEFT) & (offs_n[None, :] <= qp[:, None] + WIN_RIGHT)
        if HAS_KPM:
            pad = tl.load(KPMp + b * stride_kpm_b + offs_n.to(tl.int64) * stride_kpm_k, mask=n_ok, other=0)
            ok = ok & (pad != 0)[None, :]
        if HAS_AM:
            am = tl.load(AMp + b * stride_am_b + h[:, None].to(tl.int64) * stride_am_h
                         + i[:, None].to(tl.int64) * stride_am_q + offs_n[None, :].to(tl.int64) * stride_am_k,
                         mask=row_ok[:, None] & n_ok[None, :], other=0)
            ok = ok & (am != 0)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # [BM,BN]@[BN,DV]
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, (m_safe + tl.log2(tl.where(l_i > 0, l_i, 1.0))) / LOG2E, float("-inf"))
    # partials: (B * HKV, SPLITS, BLOCK_M, DV) and (B * HKV, SPLITS, BLOCK_M), contiguous
    nsplit = tl.num_programs(0)
    part = (bhk.to(tl.int64) * nsplit + split) * BLOCK_M
    tl.store(OPARTp + (part + offs_r[:, None]) * DV + offs_dv[None, :], out, mask=offs_dv[None, :] < DV)
    tl.store(LSEPARTp + part + offs_r, lse)


@triton.jit
def flash_decode_combine_kernel(
    OPARTp, LSEPARTp, SINKp, Op, LSEp,
    stride_ob, stride_ot, stride_oh, stride_od,
    Q, H, HKV, GROUP, SPLITS, ROWS: tl.constexpr, DV: tl.constexpr,
    HAS_SINKS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the split-KV partials of one query row by their lse; apply the sink; write out and lse."""
    pid = tl.program_id(0)
    bhk = pid // (GROUP * Q)
    r = pid % (GROUP * Q)
    b = (bhk // HKV).to(tl.int64)
    h = (bhk % HKV) * GROUP + r // Q
    i = r % Q
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    part = (bhk.to(tl.int64) * SPLITS + offs_s) * ROWS + r
    lse_s = tl.load(LSEPARTp + part, mask=offs_s < SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    tot = tl.sum(w, 0)
    o = tl.load(OPARTp + part[:, None] * DV + offs_dv[None, :],
                mask=(offs_s[:, None] < SPLITS) & (offs_dv[None, :] < DV), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(tot > 0, tot, 1.0)
    lse = tl.where(tot > 0, m_safe + tl.log(tl.where(tot > 0, tot, 1.0)), float("-inf"))
    if HAS_SINKS:
        # the sink joins the denominator: scale by sum / (sum + e^sink)
        out = out / (1.0 + tl.exp(tl.load(SINKp + h).to(tl.float32) - lse))
    tl.store(Op + b * stride_ob + i.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh + offs_dv * stride_od,
             out.to(Op.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSEp + (b * H + h) * Q + i, lse)
