"""The adaptive mode: estimate where the attention mass is, keep those blocks, run them block-sparse.

Per call that the router sends here (a prefill long enough for the policy, see ``hf_ahfa.policy``):
``hf_ahfa.estimate`` scores the (query block, key block) pairs, ``hf_ahfa.select`` keeps the blocks as a
``BlockLayout``, ``hf_ahfa.block_sparse`` computes them. Inference calls on the GPU replay a CUDA graph
(``hf_ahfa.graphs``).
"""

from __future__ import annotations

from hf_ahfa import graphs, telemetry
from hf_ahfa.block_layout import BlockLayout
from hf_ahfa.block_sparse import sparse_kernels, sparse_reference
from hf_ahfa.estimate import estimate_row_mass, estimate_row_tiles
from hf_ahfa.policy import AdaptivePolicy
from hf_ahfa.select import select_layout, select_layout_of_tiles
from hf_ahfa.router import choose_backend, requested_backend
from hf_ahfa.spec import AttnCall, make_call


def adaptive_attention(q, k, v, call: AttnCall, policy: AdaptivePolicy, *, kernels: bool):
    """Block-sparse attention under ``policy``: ``(out, lse)``. Nothing here waits for the GPU (unless
    ``record()`` is active): on the Triton kernels, inference calls replay the estimator, the selection and the
    block-sparse kernels as one CUDA graph per shape where they can (``hf_ahfa.graphs``)."""
    if kernels and call.dropout_p == 0 and not telemetry.recording() and graphs.graphable((q, k, v, call.sinks)):
        # the call's masks and sinks travel as graph inputs; the rest of the spec is part of the key
        static = call.replace(sinks=None, key_padding_mask=None)
        key = (policy, static.causal, static.window, static.scale, static.softcap)

        def run(q_, k_, v_, sinks_, kpm_):
            return _adaptive(q_, k_, v_, static.replace(sinks=sinks_, key_padding_mask=kpm_), policy, kernels=True)

        return graphs.replay(run, (q, k, v, call.sinks, call.key_padding_mask), key)
    return _adaptive(q, k, v, call, policy, kernels=kernels)


def _select(q, k, call: AttnCall, policy: AdaptivePolicy, *, backward: bool, kernels: bool = True):
    """The estimate and the selection: the kernel-ready layout, the fallen-back heads, the visible blocks; on the
    Triton kernels (``kernels``) or by the references."""
    shape = dict(causal=call.causal, window=call.window, element_masks=call.element_masks, backward=backward)
    if kernels:
        return select_layout_of_tiles(estimate_row_tiles(q, k, call, policy), q.shape[1], k.shape[1], policy, **shape)
    return select_layout(estimate_row_mass(q, k, call, policy), q.shape[1], k.shape[1], policy, **shape)


def _adaptive(q, k, v, call: AttnCall, policy: AdaptivePolicy, *, kernels: bool):
    layout, dense, touched = _select(q, k, call, policy, backward=kernels and call.needs_grad(q, k, v), kernels=kernels)
    if telemetry.recording():
        visible = touched.expand(*layout.shape).sum((2, 3)).clamp_min(1)
        head = ((layout.kv_count.sum(-1) + layout.full_count.sum(-1)) / visible).mean(0)
        telemetry.note(q, k, path="sparse", route="adaptive",
                       backend="triton" if kernels else "reference", reason=None, density=head.mean().item(),
                       head_density=head.tolist(), dense_heads=int(dense.sum()))
    if not kernels:
        return sparse_reference(q, k, v, layout, call)
    # tile skipping is a forward-only approximation: never under a gradient or dropout
    inference = not call.needs_grad(q, k, v) and call.dropout_p == 0
    return sparse_kernels(q, k, v, layout, call, skip_mass=policy.skip_mass if inference else 0.0)


def estimate_layout(q, k, policy: AdaptivePolicy, *, causal: bool = False, window=None, softcap=None, scale=None,
                    key_padding_mask=None, backend: str | None = None) -> BlockLayout:
    """The blocks the adaptive mode would keep for this call, as a ``BlockLayout`` (estimator and selection
    alone, whatever the policy's ``mode``; arguments as ``hf_ahfa.attention``, no packed sequences). Its
    ``to_dense()`` is the kept selection, fitted to the call's causal/window band.

    ``q (B, Q, Hq, D)``, ``k (B, K, Hkv, D)``; the layout is ``(B, Hq, ceil(Q / bs), ceil(K / bs))`` for
    ``bs = policy.block_size``.
    """
    call = make_call(q, k, k, causal=causal, window=window, softcap=softcap, scale=scale,
                     key_padding_mask=key_padding_mask)
    kernels = choose_backend(q, requested_backend(backend)) == "triton"
    return _select(q, k, call, policy, backward=False, kernels=kernels)[0]
