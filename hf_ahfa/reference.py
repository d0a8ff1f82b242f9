"""PyTorch reference backend: exact attention, readable, and the oracle the kernels are tested against.

Tiled over query and key blocks with an online softmax, so inference memory is O(T * block) instead of
O(T^2), and tiles that no query can see are skipped (causal, window, packed sequences). Scores,
softmax and accumulation run in float32 (float64 for float64 inputs). Autograd differentiates through
the tiles, so training memory is that of eager attention; the Triton kernels recompute instead.
A NaN or inf in the key or value at a position a query cannot see never reaches that query's output or
gradients; a query that sees one gets NaN.

All tensors use the public layout: ``q (B, Q, Hq, D)``, ``k (B, K, Hkv, D)``, ``v (B, K, Hkv, Dv)``.
"""

from __future__ import annotations

import functools

import torch

from hf_ahfa.masks import Layout, make_layout, visible
from hf_ahfa.spec import AttnCall


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor | None, hkv: int) -> torch.Tensor | None:
    """``(B, H|1, ...)`` -> ``(B, Hkv|1, G|1, ...)`` so that GQA never expands K/V."""
    if x is None:
        return None
    return x.unflatten(1, (hkv, -1)) if x.shape[1] > 1 else x.unsqueeze(1)


def _scores(qt, kt, scale, softcap):
    """``softcap * tanh(qt @ kt^T * scale / softcap)`` (or without the cap), ``[.., R, D] @ [.., D, C] -> [.., R,
    C]``, in as few passes over the R x C scores as the function allows (each costs about what the matmul does on a
    CPU): the scale and 1 / softcap on the queries, tanh in place (autograd keeps neither the matmul's output nor
    the product's with a number)."""
    s = (qt * (scale if softcap is None else scale / softcap)) @ kt.transpose(-1, -2)
    return s if softcap is None else s.tanh_() * softcap


def _alibi(call: AttnCall, layout: Layout, rows, cols, hkv: int, dtype) -> torch.Tensor | int:
    """``-slope * |query position - key position|`` for the rows and columns, grouped as the scores
    ``(B|1, Hkv, G, R, C)`` (positions are in-sequence: packed sequences index the slopes by sequence); 0
    without ALiBi."""
    if call.alibi is None:
        return 0
    dist = (layout.q_pos[rows, None] - layout.k_pos[None, cols]).abs().to(dtype)  # (R, C)
    slopes = call.alibi.to(dtype)
    if slopes.dim() == 1:
        return -slopes.view(1, hkv, -1, 1, 1) * dist
    if call.cu_seqlens is None:  # (B, Hq): one row of slopes per batch row
        return -slopes.view(slopes.shape[0], hkv, -1, 1, 1) * dist
    # packed: the slopes of each query row's sequence
    return -slopes[layout.q_seq[rows]].T.reshape(1, hkv, -1, dist.shape[0], 1) * dist


def _finite_keys(kt: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values ``[.., C, D]`` with the rows of non-finite keys or values zeroed, and those rows
    ``[.., C]``: a query that cannot see such a key gets probability 0 there, but 0 * NaN would still be NaN
    in ``p @ v`` (and in ``dS @ k`` of the backward)."""
    bad = ~(torch.isfinite(kt).all(-1) & torch.isfinite(vt).all(-1))
    return kt.masked_fill(bad[..., None], 0.0), vt.masked_fill(bad[..., None], 0.0), bad


def _dropout(p: torch.Tensor, dropout_p: float) -> torch.Tensor:
    # torch's global RNG, so activation checkpointing (which restores the RNG state) recomputes the same mask
    keep = torch.rand(p.shape, device=p.device) >= dropout_p
    return p * keep / (1.0 - dropout_p)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, call: AttnCall, *,
                        block_q: int = 256, block_k: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention. Returns ``out (B, Q, Hq, Dv)`` in q's dtype and ``lse (B, Hq, Q)`` float32.

    ``lse`` is the log-sum-exp of the visible scores (sinks excluded, ``-inf`` for a row that sees no
    key) and carries no gradient. ``layout``: the rows' and columns' coordinates (``hf_ahfa.masks``).
    """
    B, Q, Hq, _ = q.shape
    K, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    ct = _compute_dtype(q.dtype)
    qg = q.permute(0, 2, 1, 3).unflatten(1, (Hkv, -1))  # (B, Hkv, G, Q, D), a view
    kg = k.permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hkv, 1, K, D)
    vg = v.permute(0, 2, 1, 3).unsqueeze(2)
    if Q == 0 or K == 0:  # nothing to attend: zeros, still in the graph so that backward gives zero gradients
        return q.new_zeros(B, Q, Hq, Dv) + _zero_in_graph(q, k, v, call.sinks), \
            torch.full((B, Hq, Q), float("-inf"), device=q.device)
    kg, vg, bad = _finite_keys(kg, vg)  # once, not per row block
    sink = None if call.sinks is None else call.sinks.to(ct).view(1, Hkv, -1, 1)
    outs, lses = [], []
    for r0 in range(0, Q, block_q):
        rows = slice(r0, min(r0 + block_q, Q))
        qt = qg[..., rows, :].to(ct)
        R = qt.shape[-2]
        m = torch.full((B, Hkv, qt.shape[2], R), float("-inf"), dtype=ct, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(*m.shape, Dv, dtype=ct, device=q.device)
        computed = False
        for c0 in range(0, K, block_k):
            cols = slice(c0, min(c0 + block_k, K))
            ok = visible(
                layout, rows, cols, causal=call.causal, window=call.window,
                key_padding_mask=call.key_padding_mask, attn_mask=call.attn_mask,
            )
            # skip invisible tiles (a host sync, so not while torch.compile traces); the last tile runs anyway
            # when nothing else did, so that the output of fully masked rows still depends on q, k, v (zero
            # gradients, as the kernels give)
            last = c0 + block_k >= K
            if not torch.compiler.is_compiling() and not (last and not computed) and not bool(ok.any()):
                continue
            computed = True
            okg = _grouped(ok, Hkv)
            s = _scores(qt, kg[..., cols, :].to(ct), call.scale, call.softcap)
            s = (s + _alibi(call, layout, rows, cols, Hkv, ct)).masked_fill(~okg, float("-inf"))
            # a query that sees a non-finite key or value gets NaN (as without _finite_keys)
            s = s.masked_fill(okg & bad[..., None, cols], float("nan"))
            # the running max only shifts the exponent: no gradient needs to flow through it
            m_new = torch.maximum(m, s.amax(-1)).detach()
            m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
            # masked: a NaN row (it sees a non-finite key) keeps p = 0, and so no gradient, at keys it cannot see
            p = torch.exp(s - m_safe[..., None]).masked_fill(~okg, 0.0)
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            if call.dropout_p > 0:
                p = _dropout(p, call.dropout_p)
            acc = acc * alpha[..., None] + p @ vg[..., cols, :].to(ct)  # [.., R, C] @ [.., C, Dv]
            m = m_new
        m_safe = torch.where(m == float("-inf"), 0.0, m)
        den = l if sink is None else l + torch.exp(sink - m_safe)
        out = acc / torch.where(den > 0, den, 1.0)[..., None]  # rows that see nothing stay 0
        outs.append(out)
        lses.append((m_safe + torch.log(l)).detach())
    out = torch.cat(outs, dim=-2).flatten(1, 2).transpose(1, 2)  # (B, Q, Hq, Dv)
    lse = torch.cat(lses, dim=-1).flatten(1, 2).float()
    return out.to(q.dtype), lse


def _zero_in_graph(*tensors):
    """A zero scalar that depends on ``tensors`` (they get zero gradients), even where they hold inf or NaN."""
    zero = torch.zeros((), device=tensors[0].device)
    for t in tensors:
        if t is not None and t.requires_grad:
            zero = zero + torch.where(torch.zeros((), dtype=torch.bool, device=t.device), t.sum().float(), 0.0)
    return zero


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
    """Untiled exact attention, ``out (B, Q, Hq, Dv)`` in q's dtype: the whole score matrix in a few operations,
    where the tiled ``reference_attention`` spends a dozen per tile on its online softmax (memory O(Q * K)).

    Scores, mask and softmax alone where that is the same function: no key hidden from any query (a decode step),
    or, on the CPU (where asking costs no wait; not while torch.compile traces), every query sees a key and no key
    or value is non-finite. Otherwise ``reference_attention_probs`` (its guards keep rows that see nothing at zero
    and a hidden NaN out). Packed sequences, ALiBi and dropout go there too. Float32 scores for 16-bit inputs, as
    both."""
    B, Q, Hq, _ = q.shape
    K, Hkv = k.shape[1], k.shape[2]
    if call.cu_seqlens is not None or call.alibi is not None or call.dropout_p > 0 or Q == 0 or K == 0:
        return _probs_of_call(q, k, v, call)
    masked = (call.window is not None or (call.causal and Q > 1) or call.key_padding_mask is not None
              or call.attn_mask is not None)
    if masked and (q.device.type != "cpu" or torch.compiler.is_compiling()):
        return _probs_of_call(q, k, v, call)
    ct = _compute_dtype(q.dtype)
    G = Hq // Hkv
    # a key/value head's query heads as its rows: (B, Hkv, G * Q, D) against (B, Hkv, K, D), the keys and values
    # read once per key/value head (a broadcast over G would copy them G times)
    qg = q.permute(0, 2, 1, 3).reshape(B, Hkv, G * Q, -1).to(ct)
    kg = k.permute(0, 2, 1, 3).to(ct)
    vg = v.permute(0, 2, 1, 3).to(ct)
    hidden = bias = None  # True where a query cannot see a key, grouped as the scores; -inf there and 0 elsewhere
    if masked:
        hidden, blind, bias = _positions_hidden(q.device, ct, Q, K, call.causal, call.window,
                                                torch.is_inference_mode_enabled())
        if call.key_padding_mask is not None or call.attn_mask is not None:
            bias = None
            if call.key_padding_mask is not None:
                hidden = hidden | _grouped(~call.key_padding_mask[:, None, None, :], Hkv)
            if call.attn_mask is not None:
                hidden = hidden | _grouped(~call.attn_mask, Hkv)
            blind = bool(hidden.all(-1).any())
        # (host tests: free on the CPU) a row that sees nothing, or a non-finite key or value anywhere (the sums:
        # one pass each, and finite values whose sum overflows only take the guarded way)
        if blind or not bool(torch.isfinite(kg.sum() + vg.sum())):
            return _probs_of_call(q, k, v, call)
    # the mask in place, the positions' as an additive one (a third of masked_fill's time on the CPU)
    s = _scores(qg, kg, call.scale, call.softcap).view(B, Hkv, G, Q, K)
    if bias is not None:
        s = s.add_(bias)
    elif hidden is not None:
        s = s.masked_fill_(hidden, float("-inf"))
    if call.sinks is None:
        p = torch.softmax(s, -1)
    else:  # the sink's logit as one more column of the softmax, then dropped
        sink = call.sinks.to(ct).view(1, Hkv, -1, 1, 1).expand(*s.shape[:-1], 1)
        p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :K]
    out = p.reshape(B, Hkv, G * Q, K) @ vg  # (B, Hkv, G * Q, Dv)
    return out.view(B, Hq, Q, -1).transpose(1, 2).to(q.dtype)


def _probs_of_call(q, k, v, call: AttnCall) -> torch.Tensor:
    layout = make_layout(q.shape[1], k.shape[1], q.device, *(call.cu_seqlens or (None, None)))
    return reference_attention_probs(q, k, v, layout, call)[0]


@functools.lru_cache(maxsize=8)
def _positions_hidden(device: torch.device, dtype: torch.dtype, Q: int, K: int, causal: bool, window,
                      inference: bool) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """``(1, 1, 1, Q, K)`` True where causality or the window hides a key from a query (bottom-right aligned),
    whether a query sees no key at all, and the same mask additive in ``dtype`` (-inf where hidden), kept per
    shape: every layer of a forward asks for the same. ``inference`` (inference mode) only keys the cache."""
    hidden = ~visible(make_layout(Q, K, device), slice(0, Q), slice(0, K), causal=causal, window=window).unsqueeze(2)
    bias = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
    return hidden, bool(hidden.all(-1).any()), bias


def reference_attention_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                              call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Untiled attention that also returns the probabilities, for ``output_attentions``.

    Returns ``out (B, Q, Hq, Dv)`` and ``probs (B, Hq, Q, K)`` (after dropout, as eager attention
    returns them), both in q's dtype. Memory is O(Q * K).
    """
    Hkv = k.shape[2]
    ct = _compute_dtype(q.dtype)
    qg = q.permute(0, 2, 1, 3).unflatten(1, (Hkv, -1)).to(ct)
    kg = k.permute(0, 2, 1, 3).unsqueeze(2).to(ct)
    vg = v.permute(0, 2, 1, 3).unsqueeze(2).to(ct)
    ok = visible(
        layout, slice(None), slice(None), causal=call.causal, window=call.window,
        key_padding_mask=call.key_padding_mask, attn_mask=call.attn_mask,
    )
    kg, vg, bad = _finite_keys(kg, vg)
    okg = _grouped(ok, Hkv)
    s = _scores(qg, kg, call.scale, call.softcap) + _alibi(call, layout, slice(None), slice(None), Hkv, ct)
    s = s.masked_fill(~okg, float("-inf")).masked_fill(okg & bad[..., None, :], float("nan"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(m == float("-inf"), 0.0, m)
    p = torch.exp(s - m).masked_fill(~okg, 0.0)
    den = p.sum(-1, keepdim=True)
    if call.sinks is not None:
        den = den + torch.exp(call.sinks.to(ct).view(1, Hkv, -1, 1, 1) - m)
    p = p / torch.where(den > 0, den, 1.0)
    if call.dropout_p > 0:
        p = _dropout(p, call.dropout_p)
    out = (p @ vg).flatten(1, 2).transpose(1, 2)
    return out.to(q.dtype), p.flatten(1, 2).to(q.dtype)


def reference_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, layout: Layout,
                                 call: AttnCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` from a given output and log-sum-exp: flash-attention's backward contract, which a ring
    step needs (its ``out`` and ``lse`` are those merged over every step, not this call's own).

    With ``P = exp(S - lse)`` over the visible keys: ``dV = Pᵀ dO``, ``dS = P * (dO Vᵀ - rowsum(dO * out))``,
    ``dQ``, ``dK`` from ``dS`` through the scale and softcap. Computed by autograd of
    ``sum(dO * (P V)) - sum(rowsum(P) * rowsum(dO * out))``, whose gradient in ``S`` is exactly that ``dS``.
    ``grad_out``, ``out``: ``(B, Q, Hq, Dv)``; ``lse``: ``(B, Hq, Q)``. Untiled (O(Q * K) memory); no sinks or
    dropout (the callers refuse them).
    """
    if call.sinks is not None or call.dropout_p > 0:
        raise ValueError("reference_attention_backward takes no sinks and no dropout")
    Hkv = k.shape[2]
    ct = _compute_dtype(q.dtype)

    def grouped(x):  # (B, T, H, D) -> (B, Hkv, G, T, D)
        return x.permute(0, 2, 1, 3).unflatten(1, (Hkv, -1)).to(ct)

    ok = _grouped(visible(layout, slice(None), slice(None), causal=call.causal, window=call.window,
                          key_padding_mask=call.key_padding_mask, attn_mask=call.attn_mask), Hkv)
    lse_g = lse.unflatten(1, (Hkv, -1)).to(ct)[..., None]  # (B, Hkv, G, Q, 1)
    lse_g = torch.where(lse_g == float("-inf"), 0.0, lse_g)  # a row that sees nothing: P = 0 below
    d_out = grouped(grad_out)
    delta = (d_out * grouped(out)).sum(-1)  # (B, Hkv, G, Q)
    with torch.enable_grad():
        q_, k_, v_ = (x.detach().to(ct).requires_grad_() for x in (q, k, v))
        s = _scores(grouped(q_), grouped(k_), call.scale, call.softcap)
        s = (s + _alibi(call, layout, slice(None), slice(None), Hkv, ct)).masked_fill(~ok, float("-inf"))
        p = torch.exp(s - lse_g)
        objective = ((p @ grouped(v_)) * d_out).sum() - (p.sum(-1) * delta).sum()
        dq, dk, dv = torch.autograd.grad(objective, (q_, k_, v_))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
