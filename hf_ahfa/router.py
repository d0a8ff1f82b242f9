"""The router: the one place that decides how an attention call runs, and runs it.

    hf_ahfa.attention / Transformers' "ahfa" function
        -> make_call (hf_ahfa.spec: validate, normalise)
        -> route(): backend (reference | triton), then the path:
             "layout"    a BlockLayout was given            -> block-sparse kernels / masked reference
             "adaptive"  the adaptive policy applies         -> estimate, select, block-sparse
             "decode"    few queries over many keys          -> split-KV Triton kernel
             "flash"     everything else on Triton          -> dense flash kernels (fwd/bwd)
             "reference" no Triton (CPU, float64, forced)    -> tiled PyTorch reference
        -> telemetry.note (what ``hf_ahfa.record()`` shows)

``AHFA_BACKEND=reference|triton`` (or ``attention(..., backend=...)``) forces a backend; a forced backend
that cannot run raises instead of falling back. Automatic fallback is logged once per reason.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

from hf_ahfa import telemetry
from hf_ahfa.block_layout import BlockLayout
from hf_ahfa.masks import make_layout
from hf_ahfa.policy import AdaptivePolicy
from hf_ahfa.spec import AttnCall

BACKENDS = ("reference", "triton")
# Split-KV pays when few query rows face many keys; training needs the backward of the dense path.
DECODE_MAX_Q = 16
DECODE_MIN_K = 512

logger = logging.getLogger("hf_ahfa")
_said: set[str] = set()


class Route(NamedTuple):
    path: str  # "reference", "flash", "decode", "adaptive" or "layout"
    backend: str  # "reference" or "triton"
    reason: str | None = None  # why an adaptive policy ran exact


def triton_unavailable_reason(q: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run a call with query ``q`` (``None`` when it can)."""
    try:
        from hf_ahfa.kernels.flash import check_supported
    except ImportError as err:
        return f"the Triton kernels cannot be imported ({err})"
    try:
        check_supported(q)
    except (TypeError, ValueError, RuntimeError) as err:
        return str(err)
    return None


def choose_backend(q: torch.Tensor, requested: str | None = None) -> str:
    requested = requested or os.environ.get("AHFA_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend (or AHFA_BACKEND) must be one of {BACKENDS}, got {requested!r}")
        if requested == "triton" and (reason := triton_unavailable_reason(q)):
            raise RuntimeError(f"backend 'triton' was requested but cannot run: {reason}")
        return requested
    if q.device.type == "cuda":
        if (reason := triton_unavailable_reason(q)) is None:
            return "triton"
        if reason not in _said:
            _said.add(reason)
            logger.warning("hf_ahfa: using the PyTorch reference backend: %s", reason)
    return "reference"


def exact_reason(policy: AdaptivePolicy, q: torch.Tensor, k: torch.Tensor, call: AttnCall) -> str | None:
    """Why this call runs exact under ``policy`` (``None``: it runs block-sparse)."""
    Q, K = q.shape[1], k.shape[1]
    if policy.mode == "exact":
        return "mode=exact"
    if K == 0:
        return "no keys"
    if Q < 2 * policy.block_size:
        return f"fewer than two blocks of queries ({Q} < {2 * policy.block_size})"
    if policy.mode == "auto" and Q < policy.min_length:
        return f"auto below min_length ({Q} < {policy.min_length})"
    if call.window is not None and call.window[0] < K - 1:
        return "sliding window (the exact kernels already skip blocks outside it)"
    if call.attn_mask is not None:
        return "dense attention mask"
    if call.cu_seqlens is not None:
        return "packed sequences (no estimator for them yet)"
    return None


def route(q, k, v, call: AttnCall, *, backend: str | None, policy: AdaptivePolicy | None,
          layout: BlockLayout | None) -> Route:
    """How this call runs (see the module docstring)."""
    backend = choose_backend(q, backend)
    if layout is not None:
        return Route("layout", backend)
    reason = None
    if policy is not None:
        reason = exact_reason(policy, q, k, call)
        if reason is None:
            return Route("adaptive", backend)
    if backend == "reference":
        return Route("reference", backend, reason)
    if (call.cu_seqlens is None and q.shape[1] <= DECODE_MAX_Q and k.shape[1] >= DECODE_MIN_K
            and call.dropout_p == 0 and not call.needs_grad(q, k, v)):
        return Route("decode", backend, reason)
    return Route("flash", backend, reason)


def run(q, k, v, call: AttnCall, *, backend: str | None = None, policy: AdaptivePolicy | None = None,
        layout: BlockLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Route the call, note the decision, run it: ``(out (B, Q, Hq, Dv), lse (B, Hq, Q))``."""
    r = route(q, k, v, call, backend=backend, policy=policy, layout=layout)
    if r.path == "adaptive":  # notes its own entry, with the kept blocks
        from hf_ahfa.adaptive import adaptive_attention

        return adaptive_attention(q, k, v, call, policy, kernels=r.backend == "triton")
    telemetry.note(q_len=q.shape[1], k_len=k.shape[1], path="sparse" if r.path == "layout" else "exact",
                   route=r.path, backend=r.backend, reason=r.reason)
    if r.path == "layout":
        return _run_layout(q, k, v, call, layout, kernels=r.backend == "triton")
    if r.path == "reference":
        from hf_ahfa.reference import reference_attention

        coords = make_layout(q.shape[1], k.shape[1], q.device, *(call.cu_seqlens or (None, None)))
        return reference_attention(q, k, v, coords, call)
    a = call.kernel_args()
    if r.path == "decode":
        from hf_ahfa.kernels.flash import flash_decode

        return flash_decode(q, k, v, call.sinks, call.key_padding_mask, call.attn_mask, a["causal"], a["win_left"],
                            a["win_right"], a["softcap"], a["scale"])
    from hf_ahfa.kernels.flash import flash_fwd

    cu_q, cu_k = call.cu_seqlens or (None, None)
    return flash_fwd(q, k, v, call.sinks, call.key_padding_mask, call.attn_mask, cu_q, cu_k, call.max_q, call.max_k,
                     a["causal"], a["win_left"], a["win_right"], a["softcap"], call.dropout_p, call.dropout_seed(),
                     a["scale"])


def _run_layout(q, k, v, call: AttnCall, layout: BlockLayout, *, kernels: bool):
    from hf_ahfa.block_sparse import layout_band, sparse_kernels, sparse_reference

    if not kernels:
        return sparse_reference(q, k, v, layout, call)
    band = layout_band(call, layout.block_q, layout.block_k, call.max_q, call.max_k, q.device)
    resolved = layout.resolve(band, element_masks=call.element_masks, backward=call.needs_grad(q, k, v))
    return sparse_kernels(q, k, v, resolved, call)
