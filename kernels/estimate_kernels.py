"""Triton kernel of the adaptive mode's estimator: how much attention mass each key block gets.

The estimator takes every ``STRIDE``-th query row (the last of each group of ``STRIDE``) and computes its
exact softmax over every key it sees, summed per key block: the mass that row puts on each block.
The selection (``hf_ahfa.select``) keeps, per query block, the blocks its sampled rows need: exact rows keep
the rows' different peaks apart, which pooled (averaged) queries or keys would blur. Cost: one pass
of ``Q / STRIDE`` rows over the keys, ``1 / STRIDE`` of the ``Q K^T`` FLOPs: every program takes one
row tile and a chunk of key blocks and writes each tile's row max and sum of exponentials; the selection
kernel (or ``estimate_mass``) turns them into each row's softmax mass per block.
"""

import triton
import triton.language as tl

from hf_ahfa.kernels.common import flags, head_view, key_span, load_tile, logits, make_ctx, visible


@triton.jit
def _sampled_pos(r, q_len, k_len, STRIDE):
    """Position of sampled row ``r``: query ``min(r * STRIDE + STRIDE - 1, q_len - 1)``, bottom-right aligned."""
    return tl.minimum(r * STRIDE + STRIDE - 1, q_len - 1) + (k_len - q_len)


@triton.heuristics(dict(F=flags))
@triton.jit
def estimate_mass_kernel(
    QS, K, KPM, M, L, NR, T_Q, T_K, H, GROUP, NKB, STRIDE, S,
    D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, F: tl.constexpr,
):
    # one program: BLOCK_R sampled rows x CHUNK consecutive key blocks (BLOCK_N = the layout's block) of one
    # (batch, q head), the rows' tile loaded once; M/L (B, H, NR, NKB) get each tile's row max (log2 domain)
    # and sum of exp2, and stay -inf / 0 where the rows see nothing of the block. QS, K: (tensor, *strides),
    # KPM as in flash_fwd_kernel.
    pid_r = tl.program_id(0)
    chunk = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    cx = make_ctx(KPM, None, S, b, h, 0, 0, T_Q, T_K, bh, 0.0, F)
    first = _sampled_pos(pid_r * BLOCK_R, T_Q, T_K, STRIDE)
    last = _sampled_pos(tl.minimum(pid_r * BLOCK_R + BLOCK_R, NR) - 1, T_Q, T_K, STRIDE)
    lo, hi = key_span(first, last + 1, cx, F)
    kb_lo = tl.maximum(chunk * CHUNK, lo // BLOCK_N)
    kb_hi = tl.minimum(tl.minimum(chunk * CHUNK + CHUNK, NKB), tl.cdiv(hi, BLOCK_N))
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, F.block_d)
    qs = load_tile(head_view(QS, b, h, 0), offs_r, offs_d, NR, F.d)
    qpos = _sampled_pos(offs_r, T_Q, T_K, STRIDE)[:, None]
    out = (bh.to(tl.int64) * NR + offs_r) * NKB
    for kb in range(kb_lo, kb_hi):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        k = load_tile(head_view(K, b, h // GROUP, 0), offs_n, offs_d, T_K, F.d)
        s, _ = logits(qs, k, cx, F)  # [BR, D] @ [D, BN] -> [BR, BN]
        s = tl.where(visible(qpos, offs_n, offs_r, NR, T_K, offs_r.to(tl.int64), cx, F), s, float("-inf"))
        m = tl.max(s, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        tl.store(M + out + kb, m, mask=offs_r < NR)
        tl.store(L + out + kb, tl.sum(tl.exp2(s - m_safe[:, None]), 1), mask=offs_r < NR)
