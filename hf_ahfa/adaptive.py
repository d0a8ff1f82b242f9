"""The adaptive mode: estimate where the attention mass is, keep those blocks, run them block-sparse.

Per call (a prefill long enough for the policy, see ``hf_ahfa.policy``):

1. ``sample_queries``: every ``stride``-th query row;
2. the estimator (Triton ``hf_ahfa::estimate_mass``, or ``estimate_mass_reference``) computes each
   sampled row's exact softmax over its keys, summed per key block; ``block_mass`` averages the sampled
   rows of a query block: the estimated share of that block's attention mass in each key block;
3. ``select_blocks``: per (batch, head, query block) the fewest key blocks whose estimated mass reaches
   ``tau``, plus the sink and local blocks; a head whose selection is denser than ``density_limit``
   keeps all its visible blocks (per-head fallback);
4. the block-sparse flash kernels (or the reference with the selection expanded to a token mask).

``record()`` collects what each call did (density per head, fallbacks, why a call ran exact).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging

import torch

from hf_ahfa.block_layout import BlockLayout, band_blocks, kernel_lists
from hf_ahfa.policy import AdaptivePolicy

logger = logging.getLogger("hf_ahfa")

_records: contextvars.ContextVar[list | None] = contextvars.ContextVar("ahfa_records", default=None)
_layer: contextvars.ContextVar[int | None] = contextvars.ContextVar("ahfa_layer", default=None)


@contextlib.contextmanager
def record():
    """Collect one dict per attention call made inside the block (host syncs: for evaluation only).

    Keys: ``layer`` (Transformers' ``layer_idx`` or None), ``q_len``, ``k_len``, ``path`` (``"sparse"``
    or ``"exact"``), ``reason`` (why exact), and for estimated calls ``density`` (kept share of the
    visible blocks, mean over batch and heads), ``head_density`` (list per head), ``dense_heads``
    (heads that fell back to all blocks).
    """
    records: list[dict] = []
    token = _records.set(records)
    try:
        yield records
    finally:
        _records.reset(token)


def recording() -> bool:
    return _records.get() is not None


@contextlib.contextmanager
def layer_tag(layer: int | None):
    """Name the layer of the calls inside the block in ``record()``'s entries."""
    token = _layer.set(layer)
    try:
        yield
    finally:
        _layer.reset(token)


def _note(**entry) -> None:
    records = _records.get()
    if records is not None:
        records.append({"layer": _layer.get(), **entry})


def exact_reason(policy: AdaptivePolicy, q: torch.Tensor, k: torch.Tensor, *, window, attn_mask,
                 cu_seqlens) -> str | None:
    """Why this call runs exact under ``policy`` (``None``: it runs block-sparse)."""
    Q, K = q.shape[1], k.shape[1]
    if policy.mode == "exact":
        return "mode=exact"
    if Q < 2 * policy.block_size:
        return f"fewer than two blocks of queries ({Q} < {2 * policy.block_size})"
    if policy.mode == "auto" and Q < policy.min_length:
        return f"auto below min_length ({Q} < {policy.min_length})"
    if window is not None and window[0] < K - 1:
        return "sliding window (the exact kernels already skip blocks outside it)"
    if attn_mask is not None:
        return "dense attention mask"
    if cu_seqlens is not None:
        return "packed sequences (no estimator for them yet)"
    return None


def sample_queries(q: torch.Tensor, stride: int) -> torch.Tensor:
    """``q (B, Q, H, D)`` -> ``(B, ceil(Q / stride), H, D)``: rows ``min(r * stride + stride - 1, Q - 1)``."""
    rows = torch.clamp(torch.arange(stride - 1, q.shape[1] + stride - 1, stride, device=q.device), max=q.shape[1] - 1)
    return q[:, rows]


def estimate_mass_reference(qs, k, key_padding_mask, q_len, stride, block_k, causal, window, softcap, scale):
    """PyTorch reference of ``hf_ahfa::estimate_mass`` (same arguments; ``window`` a pair or None)."""
    B, NR, H, D = qs.shape
    K = k.shape[1]
    kk = k.float().repeat_interleave(H // k.shape[2], dim=2)  # a reference favours clarity over memory
    s = torch.einsum("brhd,bkhd->bhrk", qs.float(), kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    r = torch.arange(NR, device=qs.device)[:, None]
    pos = torch.clamp(r * stride + stride - 1, max=q_len - 1) + (K - q_len)
    kp = torch.arange(K, device=qs.device)[None, :]
    ok = torch.ones(NR, K, dtype=torch.bool, device=qs.device)
    if causal:
        ok = ok & (kp <= pos)
    if window is not None:
        ok = ok & (kp >= pos - window[0]) & (kp <= pos + window[1])
    ok = ok[None, None]
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
    nk = -(-K // block_k)
    p = torch.nn.functional.pad(p, (0, nk * block_k - K))
    return p.view(B, H, NR, nk, block_k).sum(-1)


def block_mass(est: torch.Tensor, q_len: int, stride: int, block_q: int) -> torch.Tensor:
    """Per sampled row ``(B, H, NR, NK)`` -> per query block ``(B, H, NQ, NK)``: the mean of its rows."""
    B, H, NR, NK = est.shape
    per = block_q // stride
    nq = -(-q_len // block_q)
    sums = torch.nn.functional.pad(est, (0, 0, 0, nq * per - NR)).view(B, H, nq, per, NK).sum(3)
    counts = torch.clamp(NR - torch.arange(nq, device=est.device) * per, max=per)
    return sums / counts[None, None, :, None]


def anchor_blocks(q_len: int, k_len: int, policy: AdaptivePolicy, causal: bool, device) -> torch.Tensor:
    """Blocks kept whatever the estimate: ``sink_blocks`` leading key blocks and ``local_blocks`` up to
    each query block's diagonal (on both sides without ``causal``): bool ``(1, 1, NQ, NK)``."""
    bs = policy.block_size
    nq, nk = -(-q_len // bs), -(-k_len // bs)
    q0 = torch.arange(nq, device=device)[:, None] * bs + (k_len - q_len)
    q_last = torch.clamp(q0 + bs, max=k_len) - 1
    k_first = torch.arange(nk, device=device)[None, :] * bs
    reach = (policy.local_blocks - 1) * bs
    local = (k_first + bs - 1 >= q0 - reach) & (k_first <= q_last + (0 if causal else reach))
    sink = (k_first < policy.sink_blocks * bs).expand(nq, nk)
    return (local | sink)[None, None]


def select_blocks(mass: torch.Tensor, touched: torch.Tensor, anchors: torch.Tensor, tau: float,
                  density_limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept blocks ``(B, H, NQ, NK)`` bool and the heads that fell back to all blocks ``(B, H)``.

    ``mass (B, H, NQ, NK)``: estimated mass per block; ``touched``: the blocks any query can see;
    ``anchors``: blocks always kept. Per query block, blocks are taken by descending mass until the
    mass already taken reaches ``tau`` (of the mass on visible blocks).
    """
    touched = touched.expand_as(mass)
    m = mass.masked_fill(~touched, 0.0)
    m = m / m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    if tau >= 1.0:
        keep = touched.clone()
    else:
        vals, order = m.sort(-1, descending=True)
        taken_before = vals.cumsum(-1) - vals
        keep = torch.zeros_like(touched).scatter(-1, order, taken_before < tau)
        keep = (keep | anchors) & touched
    visible = touched.sum((2, 3)).clamp_min(1)
    dense = keep.sum((2, 3)) > density_limit * visible
    keep = torch.where(dense[..., None, None], touched, keep)
    return keep, dense


def select(q, k, policy: AdaptivePolicy, *, causal, window, softcap, scale, key_padding_mask, backend):
    """Estimate and select: the kept blocks ``(B, H, NQ, NK)`` and the fallen-back heads ``(B, H)``."""
    Q, K = q.shape[1], k.shape[1]
    bs = policy.block_size
    qs = sample_queries(q, policy.stride)
    if backend == "triton":
        from hf_ahfa.kernels.estimate import estimate_mass

        win_left, win_right = window if window is not None else (-1, -1)
        est = estimate_mass(qs, k, key_padding_mask, Q, policy.stride, bs, causal, win_left, win_right,
                            softcap or 0.0, scale)
    else:
        est = estimate_mass_reference(qs, k, key_padding_mask, Q, policy.stride, bs, causal, window, softcap, scale)
    mass = block_mass(est, Q, policy.stride, bs)
    touched, anchors = _geometry(Q, K, policy, causal, window, q.device)
    return (*select_blocks(mass, touched, anchors, policy.tau, policy.density_limit), touched)


@functools.lru_cache(maxsize=64)
def _band(Q, K, block_q, block_k, causal, window, device):
    """``band_blocks`` of one unpacked call shape, cached: built once per shape, and without the
    host-to-device copies that would make every call wait for the GPU."""
    lens = torch.full((1,), Q, device=device), torch.full((1,), K, device=device)
    return band_blocks(*lens, block_q, block_k, -(-Q // block_q), -(-K // block_k), causal, window)


@functools.lru_cache(maxsize=64)
def _geometry(Q, K, policy, causal, window, device):
    """The visible and the always-kept blocks of one call shape (cached like ``_band``)."""
    bs = policy.block_size
    return _band(Q, K, bs, bs, causal, window, device)[0], anchor_blocks(Q, K, policy, causal, device)


# Inference calls of the Triton path replay a CUDA graph per call shape: the estimator, the selection
# and the sparse kernels are ~70 launches whose host-side cost (~2 ms) exceeds the GPU work below ~32K
# tokens. Set to False to run them eagerly (tests compare the two).
CUDA_GRAPHS = True
_GRAPHS_KEPT = 8  # graphs hold their own memory pools: keep the most recent shapes only
_graphs: dict = {}


def adaptive_attention(q, k, v, policy: AdaptivePolicy, *, causal, window, softcap, sinks, dropout_p, scale,
                       key_padding_mask, backend):
    """Block-sparse attention under ``policy``: ``(out, lse)``. Heads that fell back list every visible
    block. Nothing here waits for the GPU (unless ``record()`` is active)."""
    kw = dict(causal=causal, window=window, softcap=softcap, dropout_p=dropout_p, scale=scale)
    if _graphable(q, k, v, sinks, key_padding_mask, dropout_p, backend):
        return _replay(q, k, v, sinks, key_padding_mask, policy, kw)
    return _adaptive(q, k, v, sinks, key_padding_mask, policy, backend=backend, **kw)


def _graphable(q, k, v, sinks, key_padding_mask, dropout_p, backend) -> bool:
    tensors = [t for t in (q, k, v, sinks, key_padding_mask) if t is not None]
    return (CUDA_GRAPHS and backend == "triton" and q.is_cuda and dropout_p == 0 and not recording()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling())


def _replay(q, k, v, sinks, key_padding_mask, policy, kw):
    """``_adaptive`` through a CUDA graph captured once per call shape (inputs copied into its buffers)."""
    inputs = [t for t in (q, k, v, sinks, key_padding_mask) if t is not None]
    key = (tuple((t.shape, t.stride(), t.dtype) for t in inputs), q.device, sinks is not None,
           key_padding_mask is not None, policy, tuple(sorted(kw.items())))
    entry = _graphs.pop(key, None)
    if entry is None:
        static = [t.clone() for t in inputs]  # clone keeps the strides (e.g. Transformers' transposed views)

        def run():
            it = iter(static)
            q_, k_, v_ = next(it), next(it), next(it)
            s_ = next(it) if sinks is not None else None
            m_ = next(it) if key_padding_mask is not None else None
            return _adaptive(q_, k_, v_, s_, m_, policy, backend="triton", **kw)

        side = torch.cuda.Stream(q.device)
        side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side):
            run()  # compiles and autotunes the kernels outside the capture
        torch.cuda.current_stream(q.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
        entry = (graph, static, outputs)
        while len(_graphs) >= _GRAPHS_KEPT:
            _graphs.pop(next(iter(_graphs)))
    _graphs[key] = entry  # most recent last
    graph, static, (out, lse) = entry
    for dst, src in zip(static, inputs):
        dst.copy_(src)
    graph.replay()
    return out.clone(), lse.clone()


def _adaptive(q, k, v, sinks, key_padding_mask, policy, *, causal, window, softcap, dropout_p, scale, backend):
    keep, dense, touched = select(q, k, policy, causal=causal, window=window, softcap=softcap, scale=scale,
                                  key_padding_mask=key_padding_mask, backend=backend)
    if recording():
        visible = touched.expand_as(keep).sum((2, 3)).clamp_min(1)
        head = (keep.sum((2, 3)) / visible).mean(0)
        _note(q_len=q.shape[1], k_len=k.shape[1], path="sparse", reason=None, density=head.mean().item(),
              head_density=head.tolist(), dense_heads=int(dense.sum()))
    return _sparse(q, k, v, keep, None, policy.block_size, policy.block_size, causal=causal, window=window,
                   softcap=softcap, sinks=sinks, dropout_p=dropout_p, scale=scale,
                   key_padding_mask=key_padding_mask, cu_seqlens=None, backend=backend)


def sparse_attention(q, k, v, layout: BlockLayout, *, causal, window, softcap, sinks, dropout_p, scale,
                     key_padding_mask, cu_seqlens, backend):
    """Attention restricted to the blocks of ``layout`` (keys elsewhere count as masked): ``(out, lse)``.

    ``layout`` is ``(B, H, NQ, NK)`` over each batch row, or over each packed sequence of ``cu_seqlens``.
    The reference backend expands the layout to a token mask; the Triton one runs the sparse kernels.
    """
    full = layout.to_dense(full=True) if layout.full_count is not None else None
    return _sparse(q, k, v, layout.to_dense(), full, layout.block_q, layout.block_k, causal=causal, window=window,
                   softcap=softcap, sinks=sinks, dropout_p=dropout_p, scale=scale,
                   key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, backend=backend)


def _sparse(q, k, v, selected, full_hint, block_q, block_k, *, causal, window, softcap, sinks, dropout_p, scale,
            key_padding_mask, cu_seqlens, backend):
    """``sparse_attention`` on a bool ``(B, H, NQ, NK)`` selection."""
    from hf_ahfa.masks import make_layout

    Q, K = q.shape[1], k.shape[1]
    if backend != "triton":
        from hf_ahfa.reference import reference_attention

        mask = _token_mask(selected, block_q, block_k, cu_seqlens, Q, K)
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, None, :]
        return reference_attention(q, k, v, make_layout(Q, K, q.device, *(cu_seqlens or (None, None))),
                                   causal=causal, window=window, softcap=softcap, sinks=sinks, dropout_p=dropout_p,
                                   scale=scale, key_padding_mask=None, attn_mask=mask)
    from hf_ahfa.kernels.sparse import sparse_fwd

    if cu_seqlens is None:  # one band for every batch row, cached per shape
        q_lens = k_lens = None
        max_q, max_k = Q, K
        band = _band(Q, K, block_q, block_k, causal, window, q.device)
    else:
        q_lens, k_lens = cu_seqlens[0].diff(), cu_seqlens[1].diff()
        max_q, max_k = int(q_lens.max()), int(k_lens.max())
        band = None
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, sinks) if t is not None)
    rows, cols = kernel_lists(selected, full_hint, block_q, block_k, causal=causal, window=window, q_lens=q_lens,
                              k_lens=k_lens, element_masks=key_padding_mask is not None, backward=needs_grad,
                              band=band)
    seed = int(torch.randint(0, 2**30, ())) if dropout_p > 0 else 0
    return sparse_fwd(q, k, v, sinks, key_padding_mask, None, *(cu_seqlens or (None, None)), max_q, max_k, causal,
                      *(window if window is not None else (-1, -1)), softcap or 0.0, dropout_p, seed, scale,
                      *rows, *(cols if cols is not None else (None,) * 4), block_q, block_k)


def _token_mask(selected: torch.Tensor, block_q: int, block_k: int, cu_seqlens, Q: int, K: int) -> torch.Tensor:
    """A bool block selection as a token mask ``(B, H, Q, K)`` (packed: ``(1, H, Q, K)``, sequences on the
    diagonal)."""
    if cu_seqlens is None:
        return selected.repeat_interleave(block_q, 2).repeat_interleave(block_k, 3)[:, :, :Q, :K]
    mask = torch.zeros(1, selected.shape[1], Q, K, dtype=torch.bool, device=selected.device)
    cu_q, cu_k = cu_seqlens[0].tolist(), cu_seqlens[1].tolist()
    for i in range(len(cu_q) - 1):
        blocks = selected[i].repeat_interleave(block_q, 1).repeat_interleave(block_k, 2)
        mask[0, :, cu_q[i]:cu_q[i + 1], cu_k[i]:cu_k[i + 1]] = blocks[:, : cu_q[i + 1] - cu_q[i], : cu_k[i + 1] - cu_k[i]]
    return mask


def note_exact(q, k, reason: str) -> None:
    """Record a call that ran exact (no-op unless ``record()`` is active)."""
    _note(q_len=q.shape[1], k_len=k.shape[1], path="exact", reason=reason)
