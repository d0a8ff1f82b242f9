"""Triton kernel of the adaptive mode's estimator: how much attention mass each key block gets.

The estimator takes every ``STRIDE``-th query row (the last of each group of ``STRIDE``) and computes its
exact softmax over every key it sees, summed per key block: the mass that row puts on each block.
Averaged over a block's sampled rows (``hf_ahfa.adaptive.block_mass``) this tracks the true block mass
closely, unlike pooled (averaged) queries or keys, which blur the rows' different peaks. Cost: one pass
of ``Q / STRIDE`` rows over the keys, ``1 / STRIDE`` of the ``Q K^T`` FLOPs: every program takes one
(row tile, key block) pair and writes that tile's row max and sum of exponentials; the launcher turns
them into each row's softmax mass per block.
"""

import triton
import triton.language as tl

from hf_ahfa.kernels.flash_kernels import _scores


@triton.jit
def _sampled_pos(r, q_len, k_len, STRIDE):
    """Position of sampled row ``r``: query ``min(r * STRIDE + STRIDE - 1, q_len - 1)``, bottom-right aligned."""
    return tl.minimum(r * STRIDE + STRIDE - 1, q_len - 1) + (k_len - q_len)


@triton.jit
def _sampled_visible(s, offs_r, offs_n, NR, q_len, k_len, STRIDE, KPMp, stride_kpm_k, kpm_off,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, WIN_LEFT, WIN_RIGHT, HAS_KPM: tl.constexpr):
    """Mask the scores of the sampled rows by the positional rules and key padding."""
    pos = _sampled_pos(offs_r, q_len, k_len, STRIDE)[:, None]
    kp = offs_n[None, :]
    ok = (offs_r[:, None] < NR) & (kp < k_len)
    if CAUSAL:
        ok = ok & (kp <= pos)
    if HAS_WINDOW:
        ok = ok & (kp >= pos - WIN_LEFT) & (kp <= pos + WIN_RIGHT)
    if HAS_KPM:
        pad = tl.load(KPMp + kpm_off + offs_n.to(tl.int64) * stride_kpm_k, mask=offs_n < k_len, other=0)
        ok = ok & (pad != 0)[None, :]
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _sampled_scores(qs, k_base, start_n, offs_r, offs_d, stride_kt, stride_kd, NR, Q, K, STRIDE, qk_scale,
                    softcap, KPMp, stride_kpm_k, kpm_off, WIN_LEFT, WIN_RIGHT, D: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Masked log2-domain scores of the sampled rows against the key tile at ``start_n``: [BR, BN]."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
                mask=(offs_n[:, None] < K) & (offs_d[None, :] < D), other=0.0)
    s, _ = _scores(qs, k, offs_r, offs_n, NR, K, qk_scale, softcap, KPMp, 0, 0, KPMp, 0, 0, 0,
                   False, False, 0, 0, SOFTCAP, False, False, PRECISION, False)
    return _sampled_visible(s, offs_r, offs_n, NR, Q, K, STRIDE, KPMp, stride_kpm_k, kpm_off,
                            CAUSAL, HAS_WINDOW, WIN_LEFT, WIN_RIGHT, HAS_KPM)


@triton.jit
def estimate_mass_kernel(
    QSp, Kp, KPMp, Mp, Lp,
    stride_qb, stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_kpm_b, stride_kpm_k,
    NR, Q, K, H, GROUP, NKB, STRIDE, D: tl.constexpr,
    qk_scale, softcap, WIN_LEFT, WIN_RIGHT,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program: BLOCK_R sampled rows x one key block (BLOCK_N = the layout's block) of one
    # (batch, q head); M/L (B, H, NR, NKB) get the tile's row max (log2 domain) and sum of exp2, and
    # stay -inf / 0 where the rows see nothing of the block
    pid_r = tl.program_id(0)
    kb = tl.program_id(1)
    bh = tl.program_id(2)
    start_n = kb * BLOCK_N
    first = _sampled_pos(pid_r * BLOCK_R, Q, K, STRIDE)
    last = _sampled_pos(tl.minimum(pid_r * BLOCK_R + BLOCK_R, NR) - 1, Q, K, STRIDE)
    if CAUSAL:
        if start_n > last:
            return
    if HAS_WINDOW:
        if start_n + BLOCK_N - 1 < first - WIN_LEFT:
            return
        if not CAUSAL:
            if start_n > last + WIN_RIGHT:
                return
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    qs = tl.load(QSp + b * stride_qb + h.to(tl.int64) * stride_qh + offs_r[:, None].to(tl.int64) * stride_qr
                 + offs_d[None, :] * stride_qd, mask=(offs_r[:, None] < NR) & (offs_d[None, :] < D), other=0.0)
    k_base = Kp + b * stride_kb + hk.to(tl.int64) * stride_kh
    s = _sampled_scores(qs, k_base, start_n, offs_r, offs_d, stride_kt, stride_kd, NR, Q, K, STRIDE, qk_scale,
                        softcap, KPMp, stride_kpm_k, b * stride_kpm_b, WIN_LEFT, WIN_RIGHT, D, CAUSAL, HAS_WINDOW,
                        SOFTCAP, HAS_KPM, PRECISION, BLOCK_N)
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    out = (bh.to(tl.int64) * NR + offs_r) * NKB + kb
    tl.store(Mp + out, m, mask=offs_r < NR)
    tl.store(Lp + out, tl.sum(tl.exp2(s - m_safe[:, None]), 1), mask=offs_r < NR)
