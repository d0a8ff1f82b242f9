"""Triton kernel of the adaptive mode's estimator: how much attention mass each key block gets.

The estimator scores a pooled query (the mean of ``POOL`` consecutive query rows; its score against a
key is the rows' mean score) against every key at full resolution, so single important keys (sinks,
named entities) are not averaged away as with pooled keys. Its softmax, summed per key block, is the
estimated mass. Cost: two passes of ``Q / POOL`` rows over the keys, ``2 / POOL`` of the ``Q K^T`` FLOPs.
"""

import triton
import triton.language as tl

from hf_ahfa.kernels.flash_kernels import _scores


@triton.jit
def _pooled_visible(s, offs_r, offs_n, NR, q_len, k_len, POOL, KPMp, stride_kpm_k, kpm_off,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, WIN_LEFT, WIN_RIGHT, HAS_KPM: tl.constexpr):
    """Mask the scores of pooled rows: a pooled row sees what any of its queries sees."""
    shift = k_len - q_len
    first = offs_r * POOL + shift
    last = tl.minimum(offs_r * POOL + POOL, q_len) - 1 + shift
    kp = offs_n[None, :]
    ok = (offs_r[:, None] < NR) & (kp < k_len)
    if CAUSAL:
        ok = ok & (kp <= last[:, None])
    if HAS_WINDOW:
        ok = ok & (kp >= first[:, None] - WIN_LEFT) & (kp <= last[:, None] + WIN_RIGHT)
    if HAS_KPM:
        pad = tl.load(KPMp + kpm_off + offs_n.to(tl.int64) * stride_kpm_k, mask=offs_n < k_len, other=0)
        ok = ok & (pad != 0)[None, :]
    return tl.where(ok, s, float("-inf"))


@triton.jit
def estimate_mass_kernel(
    QBp, Kp, KPMp, ESTp,
    stride_qb, stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_kpm_b, stride_kpm_k,
    NR, Q, K, H, GROUP, NKB, POOL, D: tl.constexpr,
    qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program: BLOCK_R pooled rows of one (batch, q head); BLOCK_N = the layout's key block, so
    # pass 2 writes one estimate per (pooled row, key block): EST (B, H, NR, NKB), zero where unseen
    pid_r = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    qb = tl.load(QBp + b * stride_qb + h.to(tl.int64) * stride_qh + offs_r[:, None].to(tl.int64) * stride_qr
                 + offs_d[None, :] * stride_qd, mask=(offs_r[:, None] < NR) & (offs_d[None, :] < D), other=0.0)
    k_base = Kp + b * stride_kb + hk.to(tl.int64) * stride_kh
    kpm_off = b * stride_kpm_b
    shift = K - Q
    r0 = pid_r * BLOCK_R
    lo = 0
    hi = K
    if CAUSAL:
        hi = tl.minimum(hi, tl.minimum(r0 * POOL + BLOCK_R * POOL, Q) + shift)
    if HAS_WINDOW:
        lo = (tl.maximum(r0 * POOL + shift - WIN_LEFT, 0) // BLOCK_N) * BLOCK_N
        if not CAUSAL:
            hi = tl.minimum(hi, tl.minimum(r0 * POOL + BLOCK_R * POOL, Q) + shift + WIN_RIGHT)
    hi = tl.maximum(hi, 0)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
                    mask=(offs_n[:, None] < K) & (offs_d[None, :] < D), other=0.0)
        s, _ = _scores(qb, k, offs_r, offs_n, NR, K, qk_scale, softcap, KPMp, 0, 0, KPMp, 0, 0, 0,
                       False, False, 0, 0, SOFTCAP, False, False, PRECISION, False)
        s = _pooled_visible(s, offs_r, offs_n, NR, Q, K, POOL, KPMp, stride_kpm_k, kpm_off,
                            CAUSAL, HAS_WINDOW, WIN_LEFT, WIN_RIGHT, HAS_KPM)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # rows that see nothing get +inf, so their estimates are 0
    lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    est_base = ESTp + (bh.to(tl.int64) * NR + offs_r) * NKB
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
                    mask=(offs_n[:, None] < K) & (offs_d[None, :] < D), other=0.0)
        s, _ = _scores(qb, k, offs_r, offs_n, NR, K, qk_scale, softcap, KPMp, 0, 0, KPMp, 0, 0, 0,
                       False, False, 0, 0, SOFTCAP, False, False, PRECISION, False)
        s = _pooled_visible(s, offs_r, offs_n, NR, Q, K, POOL, KPMp, stride_kpm_k, kpm_off,
                            CAUSAL, HAS_WINDOW, WIN_LEFT, WIN_RIGHT, HAS_KPM)
        mass = tl.sum(tl.exp2(s - lse2[:, None]), 1)  # [BLOCK_R]
        tl.store(est_base + start_n // BLOCK_N, mass, mask=offs_r < NR)
