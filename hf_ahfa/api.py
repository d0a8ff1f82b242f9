"""``hf_ahfa.attention``: the public functional entry point (a thin wrapper over the router)."""

from __future__ import annotations

import torch

from hf_ahfa import checks, router
from hf_ahfa.block_layout import BlockLayout
from hf_ahfa.policy import AdaptivePolicy
from hf_ahfa.spec import make_call


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    policy: AdaptivePolicy | None = None,
    layout: BlockLayout | None = None,
):
    """Scaled-dot-product attention: exact, or block-sparse where ``policy`` or ``layout`` says so.

    The mask, for a causal call with ``Q = 3`` queries over ``K = 5`` keys (bottom-right aligned) and
    ``window=3`` (``window=(2, 0)``)::

                 keys 0 1 2 3 4
        query 0 (pos 2)  x x x . .
        query 1 (pos 3)  . x x x .
        query 2 (pos 4)  . . x x x

    Args:
        q: ``(B, Q, Hq, D)``; any strides.
        k: ``(B, K, Hkv, D)`` with ``Hq % Hkv == 0`` (GQA/MQA, never expanded).
        v: ``(B, K, Hkv, Dv)``. Head dims up to 256; float16, bfloat16, float32 or float64.
        causal: query ``i`` sees keys ``j <= i + K - Q`` (bottom-right aligned when ``K > Q``).
        window: ``None``; an int ``W`` as Transformers' ``sliding_window`` (causal: ``p - W < j <= p``,
            otherwise ``|p - j| < W``); or ``(left, right)``: ``p - left <= j <= p + right``.
        softcap: scores become ``softcap * tanh(s / softcap)`` before masking.
        sinks: ``(Hq,)`` one logit per query head that joins the softmax denominator only.
        dropout_p: dropout on the attention probabilities, drawn from torch's RNG.
        scale: score scale, default ``D ** -0.5``.
        key_padding_mask: ``(B, K)`` bool, True = real key.
        attn_mask: ``(B|1, Hq|1, Q, K)`` bool, True = visible.
        cu_seqlens: packed variable-length batch (``B == 1``): int tensor ``(N + 1,)`` of sequence
            offsets shared by q and k, or a ``(cu_seqlens_q, cu_seqlens_k)`` pair; rules above apply
            inside each sequence, never across.
        alibi_slopes: ALiBi, as flash-attn's ``alibi_slopes``: ``(Hq,)`` or ``(B, Hq)`` (``B`` = sequences
            with ``cu_seqlens``) slopes; ``-slope * |p - j|`` is added to the score of query position ``p``
            (``i + K - Q``) and key ``j`` after the softcap. Exact path and block-sparse layouts; an adaptive
            policy runs exact with it (no estimator for ALiBi yet).
        return_lse: also return the log-sum-exp ``(B, Hq, Q)`` float32 of the visible scores (sinks
            excluded; no gradient).
        backend: ``"reference"`` or ``"triton"`` (our own code only), ``"sdpa"`` (PyTorch's kernels; raises
            where they do not compute this call exactly); default: ``AHFA_BACKEND``, else automatic: SDPA
            where it computes the call exactly and is faster (always on the CPU; timed once per shape on
            CUDA), else Triton on CUDA and the reference elsewhere.
        policy: the adaptive mode's policy (``hf_ahfa.AdaptivePolicy``); ``None`` runs exact. Long
            prefills it selects run block-sparse over the key blocks the estimator keeps (keys outside
            them count as masked); everything else runs exact.
        layout: a ``hf_ahfa.BlockLayout`` to compute only its blocks (block-sparse attention with a
            layout you build; keys outside it count as masked). ``(B, H, NQ, NK)`` per batch row, or per
            packed sequence with ``cu_seqlens``; not together with ``policy`` or ``attn_mask``.

    Returns:
        ``out (B, Q, Hq, Dv)`` contiguous in q's dtype (and ``lse`` if asked). A query that sees no key
        gets zeros and ``lse = -inf``.
    """
    call = make_call(q, k, v, causal=causal, window=window, softcap=softcap, sinks=sinks, dropout_p=dropout_p,
                     scale=scale, key_padding_mask=key_padding_mask, attn_mask=attn_mask, cu_seqlens=cu_seqlens,
                     alibi_slopes=alibi_slopes)
    checks.check_policy(policy)
    if layout is not None:
        checks.check_layout(layout, q, call, policy)
    out, lse = router.run(q, k, v, call, backend=backend, policy=policy, layout=layout, need_lse=return_lse)
    out = out.contiguous()
    return (out, lse) if return_lse else out
