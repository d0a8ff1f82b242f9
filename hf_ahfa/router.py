"""The router: the one place that decides how an attention call runs, and runs it.

    hf_ahfa.attention / Transformers' "ahfa" function
        -> make_call (hf_ahfa.spec: validate, normalise)
        -> inside torch's context_parallel(): its ring engine with our steps, each step routed as below
           (hf_ahfa.context_parallel.engine_attention)
        -> route(): backend (reference | triton | sdpa), then the path:
             "layout"    a BlockLayout was given            -> block-sparse kernels / masked reference
             "layout"    also a policy's mode="pattern" (its layout built per call shape, hf_ahfa.patterns)
             "adaptive"  the adaptive policy applies         -> estimate, select, block-sparse (mode "auto":
                         exact, routed again, where that was not timed faster per layer and shape, _auto_runs_exact)
             "sdpa"      PyTorch's SDPA computes exactly this call (CPU, and few-query calls without a mask:
                         always; CUDA prefill: unless our kernel was timed SDPA_MARGIN faster, once per shape,
                         hf_ahfa.fastest; sliding windows: in chunks of queries over each chunk's band of keys,
                         where timed faster than ours on any device; masks, padding, causality and the window as
                         one boolean mask, _sdpa_mask)
             "sdpa-whole"  a short windowed prompt as one SDPA call over its whole mask (CUDA: where timed
                         faster than ours and the chunks, SDPA_WINDOW_WHOLE_MAX)
             "flash-attn-2" / "flash-attn-3"  an installed flash-attn computes exactly this call (CUDA): where
                         timed faster than SDPA and ours by SDPA_MARGIN (hf_ahfa.installed)
             "decode"    few queries over many keys          -> split-KV Triton kernel
             "flash"     everything else on Triton          -> dense flash kernels (fwd/bwd)
             "reference" no Triton (CPU, float64, forced)    -> tiled PyTorch reference
             "dense"     the reference untiled (a call SDPA cannot compute, small enough, where timed faster than
                         the tiles: a softcapped or sink model's decode step on the CPU, DENSE_MAX_SCORES)
        -> telemetry.note (what ``hf_ahfa.record()`` shows)

``AHFA_BACKEND=reference|triton|sdpa`` (or ``attention(..., backend=...)``) forces a backend: ``reference``
or ``triton`` run our own code only (what benchmarks of our kernels use), ``sdpa`` raises where SDPA cannot
compute the call exactly. Automatic fallback to the reference is logged once per reason.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from hf_ahfa import installed, telemetry
from hf_ahfa.fastest import fastest, host_may_wait
from hf_ahfa.block_layout import BlockLayout
from hf_ahfa.masks import hides_no_key, make_layout, normalize_window, positions_visible
from hf_ahfa.policy import AdaptivePolicy
from hf_ahfa.spec import AttnCall, plain_call

BACKENDS = ("reference", "triton", "sdpa")
# Split-KV pays when few query rows face many keys; training needs the backward of the dense path.
DECODE_MAX_Q = 16
DECODE_MIN_K = 512
# Our kernels replace SDPA on an exact call only where they were timed this much faster: a smaller lead is within
# the timing noise of a busy host (decode calls take ~0.1-0.2 ms of host time each on the H200 machine), and
# would make ahfa slower as often as faster.
SDPA_MARGIN = 0.05
# A masked causal call reaches SDPA as one dense (B, 1, Q, K) boolean mask (what Transformers' sdpa path builds
# for padded batches); above this many elements our kernels, which read the padding vector, run it instead.
SDPA_MASK_MAX = 1 << 28
# A windowed call reaches SDPA in chunks of as many queries as its band is wide, at least this many: each chunk
# computes twice its band's scores; smaller chunks launch more calls for less work each (CPU, one layer at 4K:
# window 128 in chunks of 129 / 512 queries 25 / 43 ms; window 512 in chunks of 513 / 1024 111 / 149 ms)
SDPA_WINDOW_CHUNK = 128
# Off the CPU a short windowed prompt is also timed as one SDPA call over its whole (cached) mask, "sdpa-whole":
# there each launch costs host time the work does not (H100, Gemma-3's sliding layer at 1K: our kernel 0.11 ms,
# SDPA in two chunks 0.19 ms, where Transformers' sdpa runs the layer as one masked call). Up to this many mask
# elements (a 4K x 4K mask, 16 MB); on the CPU the chunks' smaller work wins (2K: 28 against 58 ms).
SDPA_WINDOW_WHOLE_MAX = 1 << 24
SDPA_WHOLE_DEVICES = frozenset({"cuda"})
# Devices where SDPA runs a masked GQA call (``enable_gqa`` with ``attn_mask``) on its math backend: CUDA's fused
# kernels refuse that pair, and the fallback materializes the scores in float32 with several kernels per call
# (Transformers' sdpa repeats the key/value heads for masked calls for this reason). There the masked calls get
# their key/value heads repeated instead (``_repeat_heads``).
SDPA_MASKED_GQA_REPEAT_DEVICES = frozenset({"cuda"})
# Devices where a GQA call with one query per head (a decode step) reaches SDPA packed: each key/value head's
# query heads as that head's query rows, so that its keys and values are read once, not once per query head.
# CPU, one step of 14/2 heads, D=64: 2.3x faster than enable_gqa at 1K keys, 2.9-3.7x at 4K-16K; 32/8 heads,
# D=128: 1.7-3.0x (eval/results/decode-gqa-pack-cpu.md). Not on CUDA, where SDPA's decode kernel splits the keys
# over blocks per query head and the packed call runs on a few heads' blocks: 0.03-0.5x (decode-gqa-pack-h100.md).
SDPA_PACKED_DECODE_DEVICES = frozenset({"cpu"})
# A call SDPA cannot compute (softcap, sinks, ALiBi) with at most this many scores (B * Hq * Q * K: 64 MB in
# float32) is also timed through the whole score matrix at once, "dense" (``_dense_fits``): the tiled reference costs
# a dozen operations per tile, and a softcapped model's decode steps on the CPU ran at 0.42-0.58x of eager attention
# on it (Gemma-2's layout at SmolLM2's widths, 512-2K tokens, kernels/NOTES.md).
DENSE_MAX_SCORES = 1 << 24

# torch's context_parallel() replaces this while it is active; calls made there run through its ring engine
_SDPA = F.scaled_dot_product_attention

logger = logging.getLogger("hf_ahfa")
_said: set[str] = set()


class Route(NamedTuple):
    path: str  # "reference", "dense", "flash", "decode", "sdpa", "sdpa-whole", "adaptive" or "layout"
    backend: str  # "reference", "triton", "sdpa" or "flash-attn"
    reason: str | None = None  # why an adaptive policy ran exact


def triton_unavailable_reason(q: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run a call with query ``q`` (``None`` when it can)."""
    return _triton_unavailable_reason(q.device, q.dtype)


@functools.lru_cache(maxsize=None)
def _triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    # cached: it depends on the device and dtype only, and every call asks
    try:
        from hf_ahfa.kernels.flash import check_supported
    except ImportError as err:
        return f"the Triton kernels cannot be imported ({err})"
    try:
        check_supported(torch.empty(0, device=device, dtype=dtype))
    except (TypeError, ValueError, RuntimeError) as err:
        return str(err)
    return None


def choose_backend(q: torch.Tensor, requested: str | None = None) -> str:
    """Our own backend for this call: ``requested`` (``requested_backend``'s answer), else Triton on CUDA where
    it can run, else the reference. (Whether SDPA runs the call instead is ``route``'s decision.)"""
    if requested == "triton" and (reason := triton_unavailable_reason(q)):
        raise RuntimeError(f"backend 'triton' was requested but cannot run: {reason}")
    if requested in ("reference", "triton"):
        return requested
    if q.device.type == "cuda":
        if (reason := triton_unavailable_reason(q)) is None:
            return "triton"
        if reason not in _said:
            _said.add(reason)
            logger.warning("hf_ahfa: using the PyTorch reference backend: %s", reason)
    return "reference"


def requested_backend(requested: str | None) -> str | None:
    """The backend asked for: ``backend=`` if given, else ``AHFA_BACKEND``, else None (checked)."""
    requested = requested or os.environ.get("AHFA_BACKEND") or None
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"backend (or AHFA_BACKEND) must be one of {BACKENDS}, got {requested!r}")
    return requested


def sdpa_unfit_reason(q, k, call: AttnCall, need_lse: bool) -> str | None:
    """Why PyTorch's SDPA does not compute exactly this call (``None`` when it does). Checked on every call:
    the common cases answer after a few tests."""
    Q, K = q.shape[1], k.shape[1]
    if need_lse:
        return "the log-sum-exp is asked for"
    if call.softcap is not None:
        return "softcap"
    if call.sinks is not None:
        return "sinks"
    if call.alibi is not None:
        return "ALiBi slopes"
    if call.dropout_p > 0:
        return "dropout (ahfa draws its own mask)"
    if call.cu_seqlens is not None:
        return "packed sequences"
    if Q == 0 or K == 0:
        return "an empty query or key sequence"
    # a window, and causality over K != Q keys (SDPA's is_causal aligns top-left, ahfa bottom-right), reach SDPA as
    # a mask (_sdpa_mask)
    if call.window is not None and _window_chunk_mask_elements(q, k, call) > SDPA_MASK_MAX:
        return f"a sliding window: SDPA would need a dense mask of more than {SDPA_MASK_MAX} elements per chunk"
    if _causal_needs_mask(Q, K, call.causal, call.window) and _mask_elements(q, call, Q, K) > SDPA_MASK_MAX:
        return f"causal with K != Q: SDPA would need a dense mask of more than {SDPA_MASK_MAX} elements"
    if call.causal and Q > 1 and call.element_masks and _mask_elements(q, call, Q, K) > SDPA_MASK_MAX:
        return f"causal with a mask: SDPA would need a dense mask of more than {SDPA_MASK_MAX} elements"
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device.type}"
    # rows that see no key come out as zeros with zero gradients, as in ours (``_sdpa``)
    return None


def _causal_needs_mask(Q: int, K: int, causal: bool, window) -> bool:
    """Whether a call's causality reaches SDPA as a mask rather than ``is_causal`` (top-left aligned): several
    queries over another number of keys, without a window (whose band is a mask anyway)."""
    return causal and Q > 1 and Q != K and window is None


def _window_chunk(call: AttnCall) -> int:
    """How many queries of a windowed call one SDPA call takes (``_sdpa``): as many as the band is wide."""
    left, right = call.window
    return max(SDPA_WINDOW_CHUNK, left + right + 1)


def _window_chunk_mask_elements(q, k, call: AttnCall) -> int:
    """The elements of the largest mask a windowed call hands SDPA (one chunk of queries, ``_sdpa``)."""
    chunk = _window_chunk(call)
    return _mask_elements(q, call, min(q.shape[1], chunk), min(k.shape[1], chunk + sum(call.window)))


def _mask_elements(q, call: AttnCall, rows: int, cols: int) -> int:
    """The elements of a ``rows x cols`` mask of this call for SDPA (one per batch row where element masks apply)."""
    return (q.shape[0] if call.element_masks else 1) * rows * cols


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
    if call.alibi is not None:
        return "ALiBi (no estimator for it yet)"
    return None


def route(q, k, v, call: AttnCall, *, backend: str | None, policy: AdaptivePolicy | None,
          layout: BlockLayout | None, need_lse: bool = False) -> Route:
    """How this call runs (see the module docstring)."""
    requested = requested_backend(backend)
    if requested == "sdpa":
        if layout is not None or policy is not None:
            raise ValueError("backend 'sdpa' runs exact attention only: no layout or policy")
        if why := sdpa_unfit_reason(q, k, call, need_lse):
            raise ValueError(f"backend 'sdpa' was requested but SDPA does not compute this call exactly: {why}")
        return Route("sdpa", "sdpa")
    own = choose_backend(q, requested)
    if layout is not None:
        return Route("layout", own)
    reason = None
    if policy is not None:
        reason = exact_reason(policy, q, k, call)
        if reason is None and policy.mode == "auto" and own != "triton":
            reason = "auto without the Triton kernels (the masked reference is never faster than exact)"
        if reason is None:
            return Route("adaptive", own)
    if own == "reference":
        path = "reference"
    elif (call.cu_seqlens is None and q.shape[1] <= DECODE_MAX_Q and k.shape[1] >= DECODE_MIN_K
          and call.dropout_p == 0 and not call.needs_grad(q, k, v)):
        path = "decode"
    else:
        path = "flash"
    if requested is None and (best := _fastest_exact(q, k, v, call, path, need_lse)) != path:
        return Route(best, "sdpa" if best.startswith("sdpa") else "reference" if best == "dense" else "flash-attn",
                     reason)
    return Route(path, own, reason)


def _fastest_exact(q, k, v, call: AttnCall, path: str, need_lse: bool) -> str:
    """Which implementation runs an exact call that our ``path`` can run: ``path``, ``"sdpa"`` or an installed
    flash-attn (``hf_ahfa.installed``), whichever was timed fastest for its shape (once per shape key), an
    incumbent (SDPA where it fits, else ours) keeping the call unless another was SDPA_MARGIN faster."""
    sdpa_fits = sdpa_unfit_reason(q, k, call, need_lse) is None
    if sdpa_fits and call.window is None:
        if not q.is_cuda:  # the reference is several times slower than torch's CPU kernels
            return "sdpa"
        if q.dtype == torch.float32:
            # float32: our kernels multiply in exact float32 (input_precision "ieee"), on the CUDA cores, with tiles
            # sized for 16-bit inputs; timing them would first compile each launch config, ~40 s apiece at head dim
            # 256 (sm90, scripts/compile_check.py): a float32 model's first call sat for minutes. Not timed: the
            # call runs what sdpa runs
            return "sdpa"
        if path == "decode" and not _causal_needs_mask(q.shape[1], k.shape[1], call.causal, call.window):
            # few queries: the host's time per call decides, and SDPA's is the smaller (H200 host: 120-200 us
            # against 180-280 us for our two launches; on the GPU our split-KV kernel is at best level with SDPA,
            # eval/results/host-overhead-decode-*h200.md): not timed, the difference drowns in the host's noise
            return "sdpa"
    # (a window: SDPA over each chunk's band and ours over the window's blocks, timed on every device: on the CPU
    # each wins at some lengths, kernels/NOTES.md)
    others = installed.candidates(q, k, v, call, need_lse) + (["sdpa"] if sdpa_fits else [])
    if not sdpa_fits and _dense_fits(q, k, call, path, need_lse):
        others.append("dense")
    # (prompts only, Q == K: a decode step's whole mask grows with the cache, a new mask every step, where its
    # chunk's band keeps one shape)
    if (sdpa_fits and call.window is not None and q.device.type in SDPA_WHOLE_DEVICES and q.shape[1] == k.shape[1]
            and _mask_elements(q, call, q.shape[1], k.shape[1]) <= SDPA_WINDOW_WHOLE_MAX):
        others.append("sdpa-whole")
    if not others:
        return path
    grad = call.needs_grad(q, k, v)
    # lengths in powers of two, so that a decode whose cache grows by one token is not timed again each step
    key = (q.device, q.dtype, q.shape[0], _pow2_ceil(q.shape[1]), _pow2_ceil(k.shape[1]), q.shape[2], k.shape[2],
           q.shape[3], v.shape[3], call.causal, call.window, call.softcap is not None, call.alibi is not None,
           call.sinks is not None, call.cu_seqlens is not None, call.key_padding_mask is not None,
           call.attn_mask is not None, need_lse, grad, path)

    def timed():  # built only for a key not timed yet
        return {name: _timed_call(_exact_fn(name), q, k, v, call, grad) for name in [path, *others]}

    return fastest(key, timed, default=path, device=q.device, incumbent="sdpa" if sdpa_fits else path,
                   margin=SDPA_MARGIN)


def _exact_fn(path: str):
    """The function ``fn(q, k, v, call) -> (out, lse or None)`` of an exact route."""
    if path == "sdpa":
        return _sdpa
    if path == "sdpa-whole":
        return _SDPA_WHOLE
    if path in _OWN:
        return _OWN[path]
    return functools.partial(installed.run, path)


def _dense_fits(q, k, call: AttnCall, path: str, need_lse: bool) -> bool:
    """Whether the untiled route may be timed for a call that SDPA cannot compute: beside the tiled reference only
    (not our Triton paths: on the H100 a softcapped model's decode ran no faster with it, kernels/NOTES.md), at most
    DENSE_MAX_SCORES scores, no lse, dropout or packing."""
    return (path == "reference" and call.dropout_p == 0 and call.cu_seqlens is None and not need_lse
            and q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] <= DENSE_MAX_SCORES)


def _timed_call(fn, q, k, v, call: AttnCall, grad: bool):
    """A no-argument callable running ``fn(q, k, v, call)`` for timing: forward and backward where ``grad``."""
    if not grad:
        return lambda: fn(q, k, v, call)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if call.sinks is not None and call.sinks.requires_grad:  # a model's parameter: its .grad is not the timing's
        call = dataclasses.replace(call, sinks=call.sinks.detach().requires_grad_())
    return lambda: fn(*leaves, call)[0].sum().backward()


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# Plain calls (no mask, dropout or packing; no layout, lse or forced backend; a sliding window, a softcap, sinks or
# none) with the exact path route() chose for them, remembered by everything that decision and make_call's checks
# read, so that a model's repeated calls (every layer, every decode step) skip both: ``run_plain``. Key lengths
# enter as route() reads them: Q exactly, K by its power of two and the thresholds it tests (exactly for a
# windowed call of several queries, whose window and mask sizes depend on it).
# key -> (path, its one SDPA call or None, its AttnCall or None): _remember
_plain_routes: dict[tuple, tuple[str, Callable | None, AttnCall | None]] = {}


def plain_key(query, key, value, is_causal: bool, scale, window, policy, softcap=None, sinks=None) -> tuple | None:
    """The ``run_plain`` key of a plain call from Transformers: ``(B, H, T, D)`` tensors, the layer's ``is_causal``,
    its sliding ``window`` as Transformers passes them (an int or ``None``), its ``softcap`` (a number or ``None``:
    a value that an earlier call passed make_call's checks with, as the key holds it) and its ``sinks`` (a tensor,
    each layer's own: the key holds what make_call checks of it, dtype, device and shape). ``None`` where the call
    needs the full path every time: other ranks (whose checks name the argument), other windows, and causal calls
    of several queries over more keys (Transformers' top-left alignment: the full path drops the keys past the
    queries).

    Plain ints, not slices of ``.shape``, and no helper calls: the key is built on every call of a model."""
    try:
        B, H, Q, D = query.shape
        Bk, Hk, K, Dk = key.shape
        Bv, Hv, Kv, Dv = value.shape
    except ValueError:
        return None
    causal = is_causal and Q > 1
    if causal and Q < K:
        return None
    if window is not None:
        if not isinstance(window, int):
            return None
        if hides_no_key(normalize_window(window, causal), causal, Q, K):
            window = None  # make_call would drop it (one key for a sliding layer's short calls)
    # an exact policy routes by the call alone (exact_reason reads nothing else): its mode stands for it, and the
    # policy's dataclass hash (0.7 us) is computed only for the others
    rule = "exact" if policy.mode == "exact" else policy
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad
                                        or (sinks is not None and sinks.requires_grad))
    if sinks is not None:
        sinks = (sinks.dtype, sinks.device, sinks.shape)
    return (rule, causal, scale, window, softcap, sinks, query.device, key.device, value.device, query.dtype,
            key.dtype, value.dtype, B, H, Q, D, Bk, Hk, Dk, Bv, Hv, Dv, Kv == K,
            K if window is not None and Q > 1 else 1 << max(K - 1, 0).bit_length(),  # (_pow2_ceil, inlined)
            K == 0, K >= DECODE_MIN_K, K == Q, grad)


def run_plain(query, key, value, memo: tuple, sinks: torch.Tensor | None = None) -> torch.Tensor | None:
    """A plain call in Transformers' layout (``(B, H, T, D)`` tensors, the layer's ``sinks`` or ``None``) whose
    ``plain_key`` is ``memo``, run on the exact path ``run`` chose for the same kind of call before: ``out (B, Q,
    Hq, Dv)``, else ``None`` (the caller takes the full path, which validates, routes and remembers). Not while
    recording or with AHFA_BACKEND."""
    entry = _plain_routes.get(memo)
    if (entry is None or telemetry.recording() or _ENVIRON.get(_BACKEND_KEY)
            or F.scaled_dot_product_attention is not _SDPA):
        return None
    path, sdpa, call = entry
    if sdpa is not None:  # SDPA straight on Transformers' layout: no call spec, no transposes
        return sdpa(query, key, value).transpose(1, 2)
    if call is None:  # the key holds the keys' length by its power of two: this call's own spec
        _, causal, scale, window, softcap = memo[:5]
        call = plain_call(query.shape[2], key.shape[2], query.shape[3], causal=causal, window=window, scale=scale,
                          softcap=softcap, sinks=sinks)
    elif sinks is not None:  # (kept without them: each layer has its own)
        call = call.replace(sinks=sinks.contiguous())
    if path in ("sdpa", "sdpa-whole"):
        return _sdpa_heads_first(query, key, value, call, whole=path == "sdpa-whole").transpose(1, 2)
    return _exact_fn(path)(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), call)[0]


def _remember(memo: tuple, path: str, q, k, call: AttnCall) -> None:
    """Keep ``path`` for ``run_plain`` under ``memo``, with what it can work out once rather than on each of a
    model's calls (everything it depends on is in the key): the one SDPA call on Transformers' layout where
    ``_sdpa_heads_first`` would make exactly that call (no window; causality top-left or none), else the call's spec
    where the key fixes the keys' length (a prompt, ``Q == K``; several queries under a window)."""
    Q, K, Hq, Hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    sdpa = None
    if path == "sdpa" and call.window is None and not _causal_needs_mask(Q, K, call.causal, call.window):
        causal = call.causal and Q > 1
        form = _sdpa_form(q.device, Q, Hq, Hkv, causal, None)
        sdpa = (functools.partial(_SDPA, is_causal=causal, scale=call.scale, enable_gqa=form == "gqa")
                if form in ("same", "gqa") else
                functools.partial(_sdpa_call, mask=None, causal=causal, scale=call.scale, form=form))
    exact_k = K == Q or (memo[3] is not None and Q > 1)  # as plain_key keys the length
    if call.sinks is not None:  # (a layer's parameter: run_plain takes each call's own)
        call = call.replace(sinks=None)
    _plain_routes[memo] = (path, sdpa, call if sdpa is None and exact_k else None)


# AHFA_BACKEND as run_plain reads it on every call: from the dict that os.environ keeps (its writes go there), as
# os.environ.get of an unset variable costs ~1 us (two exceptions inside os._Environ) and this ~0.05 us
_ENVIRON, _BACKEND_KEY = ((os.environ._data, os.environ.encodekey("AHFA_BACKEND")) if hasattr(os.environ, "_data")
                          else (os.environ, "AHFA_BACKEND"))


# auto runs block-sparse attention only where it was timed faster than the exact route, the estimator and the
# selection included: once per model layer and call shape (lengths by their power of two; calls from outside a
# model share one decision per shape), the two taking turns as hf_ahfa.fastest times exact kernels. A kept-share
# threshold (the exact time over our dense kernel's) was tried first: it left out the estimator's cost and the
# block-sparse kernel's overhead, and auto ran Gemma-3's global layers at 0.73x exact at 16K (H100,
# eval/results/attn-speed-gemma3-auto-h100.md). Off these devices (the interpreter's kernels) nothing is timed.
AUTO_TIMED_DEVICES = frozenset({"cuda"})


def _auto_key(layer, q, k, v, call: AttnCall, policy: AdaptivePolicy) -> tuple:
    return ("auto", layer, policy, q.device, q.dtype, q.shape[0], _pow2_ceil(q.shape[1]), _pow2_ceil(k.shape[1]),
            q.shape[2], k.shape[2], q.shape[3], v.shape[3], call.causal, call.window, call.softcap,
            call.sinks is not None, call.key_padding_mask is not None, call.needs_grad(q, k, v))


def _auto_runs_exact(q, k, v, call: AttnCall, policy: AdaptivePolicy, exact: Route, layer) -> bool:
    """``mode="auto"``: whether this call runs ``exact`` (the exact route) because block-sparse attention under
    ``policy`` was not timed ``SDPA_MARGIN`` faster for this layer and shape. Where nothing can be timed
    (torch.compile tracing, CUDA graph capture) and nothing was decided yet, the call runs as selected."""
    from hf_ahfa.adaptive import adaptive_attention

    if q.device.type not in AUTO_TIMED_DEVICES:
        return False
    grad = call.needs_grad(q, k, v)

    def sparse_fn(q_, k_, v_, call_):
        return adaptive_attention(q_, k_, v_, call_, policy, kernels=True)

    def candidates():  # built only for a layer and shape not timed yet
        return {"exact": _timed_call(_exact_fn(exact.path), q, k, v, call, grad),
                "adaptive": _timed_call(sparse_fn, q, k, v, call, grad)}

    with telemetry.paused():  # the timing runs are not the call's entries
        return fastest(_auto_key(layer, q, k, v, call, policy), candidates, default="adaptive", device=q.device,
                       incumbent="exact", margin=SDPA_MARGIN) == "exact"


def run(q, k, v, call: AttnCall, *, backend: str | None = None, policy: AdaptivePolicy | None = None,
        layout: BlockLayout | None = None, need_lse: bool = False, remember: tuple | None = None,
        layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Route the call, note the decision, run it: ``(out (B, Q, Hq, Dv), lse (B, Hq, Q) or None)``; ``lse`` is
    ``None`` only where ``need_lse`` was False and the call ran through SDPA. ``remember``: the ``plain_key``
    of a plain call, kept for ``run_plain`` with the exact path the call takes. ``layer``: the model layer making the
    call (Transformers' ``layer_idx``), whose ``auto`` decision is its own (``_auto_runs_exact``)."""
    if policy is not None and policy.mode == "pattern" and layout is None:
        layout, policy = pattern_layout(q, call, policy), None
    if F.scaled_dot_product_attention is not _SDPA:
        from hf_ahfa.context_parallel import active_group, engine_attention

        if (group := active_group()) is not None:
            return engine_attention(q, k, v, call, group, backend=backend, policy=policy, layout=layout)
    r = route(q, k, v, call, backend=backend, policy=policy, layout=layout, need_lse=need_lse)
    # (an exact path chosen while nothing could be timed is a default, not a decision: not remembered; nor one
    # forced by AHFA_BACKEND, which run_plain would keep taking once the variable is gone)
    if (remember is not None and r.path not in ("adaptive", "layout") and backend is None and not need_lse
            and not _ENVIRON.get(_BACKEND_KEY) and host_may_wait()):
        _remember(remember, r.path, q, k, call)
    if r.path == "adaptive":  # notes its own entry, with the kept blocks
        from hf_ahfa.adaptive import adaptive_attention

        kernels = r.backend == "triton"
        if policy.mode == "auto" and kernels:
            exact = route(q, k, v, call, backend=backend, policy=None, layout=None, need_lse=need_lse)
            if _auto_runs_exact(q, k, v, call, policy, exact, layer):
                r = exact._replace(reason=f"auto: block-sparse attention (estimator included) was not timed faster "
                                          f"than exact attention for layer {layer} at this shape")
        if r.path == "adaptive":
            return adaptive_attention(q, k, v, call, policy, kernels=kernels)
    telemetry.note(q, k, path="sparse" if r.path == "layout" else "exact",
                   route=r.path, backend=r.backend, reason=r.reason)
    if r.path == "layout":
        return _run_layout(q, k, v, call, layout, kernels=r.backend == "triton")
    return _exact_fn(r.path)(q, k, v, call)


def pattern_layout(q, call: AttnCall, policy: AdaptivePolicy) -> BlockLayout:
    """The layout of ``policy.pattern`` for this call (``mode="pattern"``)."""
    from hf_ahfa.patterns import from_spec

    if call.cu_seqlens is not None or call.attn_mask is not None:
        raise ValueError("mode='pattern' runs on unpacked calls without a dense attention mask (padded batches "
                         "and packed sequences are not supported with a pattern)")
    return from_spec(policy.pattern, call.max_q, call.max_k, policy.block_size, q.shape[0], q.shape[2], q.device)


def _reference(q, k, v, call: AttnCall):
    from hf_ahfa.reference import reference_attention

    coords = make_layout(q.shape[1], k.shape[1], q.device, *(call.cu_seqlens or (None, None)))
    return reference_attention(q, k, v, coords, call)


def _decode(q, k, v, call: AttnCall):
    from hf_ahfa.kernels.flash import flash_decode, run_decode

    a = call.kernel_args()
    # the op is what torch.compile must see; an eager call (never a gradient here) skips its dispatch
    fn = flash_decode if torch.compiler.is_compiling() else run_decode
    return fn(q, k, v, call.sinks, call.key_padding_mask, call.attn_mask, a["causal"], a["win_left"],
              a["win_right"], a["softcap"], a["scale"], alibi=call.alibi)


def _flash(q, k, v, call: AttnCall):
    from hf_ahfa.kernels.flash import flash_fwd, run_fwd

    a = call.kernel_args()
    cu_q, cu_k = call.cu_seqlens or (None, None)
    # the op (autograd, torch.compile) where a gradient or a trace needs it; plain inference calls skip its dispatch
    fn = flash_fwd if torch.compiler.is_compiling() or call.needs_grad(q, k, v) else run_fwd
    return fn(q, k, v, call.sinks, call.key_padding_mask, call.attn_mask, cu_q, cu_k, call.max_q, call.max_k,
              a["causal"], a["win_left"], a["win_right"], a["softcap"], call.dropout_p, call.dropout_seed(),
              a["scale"], alibi=call.alibi)


def _dense(q, k, v, call: AttnCall):
    from hf_ahfa.reference import dense_attention

    return dense_attention(q, k, v, call), None


_OWN = {"reference": _reference, "dense": _dense, "decode": _decode, "flash": _flash}


def _sdpa(q, k, v, call: AttnCall, whole: bool = False):
    """PyTorch's scaled_dot_product_attention on this call (``sdpa_unfit_reason`` is None): ``(out, None)``.

    PyTorch's own choice among its backends, exactly what ``attn_implementation="sdpa"`` gets; its global
    backend settings are left alone (``sdpa_kernel(..., set_priority=True)`` did not restore the order it
    found: plain SDPA calls after it ran FlashAttention-2 instead of cuDNN, 1.6x slower on the H200).

    A window's call runs one chunk of queries at a time against the keys that chunk's band reaches (the window's
    scores plus a chunk's width, not all ``Q x K``; a decode step over a long cache reads the window's keys only),
    each chunk with its part of the mask; ``whole``: in one SDPA call over its whole mask ("sdpa-whole")."""
    out = _sdpa_heads_first(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), call, whole)
    return out.transpose(1, 2), None


_SDPA_WHOLE = functools.partial(_sdpa, whole=True)  # the route "sdpa-whole"


def _sdpa_heads_first(query, key, value, call: AttnCall, whole: bool = False) -> torch.Tensor:
    """``_sdpa`` on Transformers' layout, ``(B, H, T, D)`` tensors as SDPA takes them: ``out (B, Hq, Q, Dv)``.
    The memo of plain calls (``run_plain``) runs here without transposes."""
    Q, K = query.shape[2], key.shape[2]
    if call.window is None or whole:
        return _sdpa_part(query, key, value, call, slice(0, Q), slice(0, K))
    left, right = call.window
    chunk = _window_chunk(call)
    outs = []
    for a in range(0, Q, chunk):
        b = min(Q, a + chunk)
        # keys lo..hi-1 hold every key that queries a..b-1 may see (at least one key, masked where none is
        # visible, so that the chunk's rows come out as zeros through SDPA and the autograd graph)
        lo = min(K - 1, max(0, a + K - Q - left))
        hi = max(lo + 1, min(K, b + K - Q + right))
        outs.append(_sdpa_part(query, key, value, call, slice(a, b), slice(lo, hi)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)  # one chunk (a decode step): no copy


def _sdpa_part(query, key, value, call: AttnCall, rows: slice, cols: slice) -> torch.Tensor:
    """SDPA on the queries ``rows`` against the keys ``cols`` of this call, on Transformers' layout:
    ``out (B, Hq, len(rows), Dv)``."""
    Q, K = query.shape[2], key.shape[2]
    mask, sees = _sdpa_mask(Q, K, query.device, query.dtype, call, rows, cols)
    if rows.stop - rows.start < Q:
        query = query[:, :, rows]
    if cols.stop - cols.start < K:
        key, value = key[:, :, cols], value[:, :, cols]
    # is_causal only where SDPA's top-left alignment is ours; elsewhere causality is in the mask (or hides nothing)
    causal = call.causal and Q > 1 and Q == K and call.window is None and mask is None
    out = _sdpa_call(query, key, value, mask, causal, call.scale)
    return out if sees is None else torch.where(sees, out, 0.0)


def _sdpa_call(query, key, value, mask: torch.Tensor | None, causal: bool, scale: float,
               form: str | None = None) -> torch.Tensor:
    """One SDPA call on ``(B, H, T, D)`` tensors, GQA in the form the device runs fastest: ``out (B, Hq, Q, Dv)``.
    ``mask``: broadcast to ``(B, Hq, Q, K)``; ``causal`` is SDPA's (top-left) ``is_causal``; ``form``:
    ``_sdpa_form``'s answer for this call where the caller kept it."""
    if form is None:
        form = _sdpa_form(query.device, query.shape[2], query.shape[1], key.shape[1], causal, mask)
    if form == "packed":
        # one query row per head: a KV head's query heads become its rows, which share the mask's one row
        B, Hq, _, D = query.shape
        Hkv = key.shape[1]
        out = F.scaled_dot_product_attention(query.reshape(B, Hkv, Hq // Hkv, D), key, value, attn_mask=mask,
                                             is_causal=False, scale=scale)
        return out.reshape(B, Hq, 1, value.shape[-1])
    if form == "repeat":
        Hq = query.shape[1]
        key, value, form = _repeat_heads(key, Hq), _repeat_heads(value, Hq), "same"
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=form == "gqa")


def _sdpa_form(device: torch.device, Q: int, Hq: int, Hkv: int, causal: bool, mask: torch.Tensor | None) -> str:
    """How ``_sdpa_call`` gives SDPA the key/value heads of a call of ``Q`` queries: ``"same"`` (as many as query
    heads), ``"packed"`` (a decode step on ``SDPA_PACKED_DECODE_DEVICES`` with one mask row for every head, which
    the packed rows can share), ``"repeat"`` (masked GQA on ``SDPA_MASKED_GQA_REPEAT_DEVICES``) or ``"gqa"``
    (SDPA's ``enable_gqa``)."""
    if Hq == Hkv:
        return "same"
    if (Q == 1 and not causal and device.type in SDPA_PACKED_DECODE_DEVICES
            and (mask is None or mask.dim() < 3 or mask.shape[-3] == 1)):
        return "packed"
    if mask is not None and device.type in SDPA_MASKED_GQA_REPEAT_DEVICES:
        return "repeat"
    return "gqa"


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``t (B, Hkv, T, D)`` with each head repeated for its ``heads // Hkv`` query heads: ``(B, heads, T, D)``, a
    view of stride 0 where there is one key/value head (SDPA's fused CUDA kernels take it), else a copy."""
    B, Hkv, T, D = t.shape
    if Hkv == 1:
        return t.expand(B, heads, T, D)
    return t[:, :, None].expand(B, Hkv, heads // Hkv, T, D).reshape(B, heads, T, D)


def sdpa_zeroes_unseen_rows(device: torch.device) -> bool:
    """Whether PyTorch's SDPA on ``device`` already gives a row that sees no key zeros with zero gradients (the
    CPU kernels' safe softmax, torch >= 2.5: tests/test_router.py)."""
    return device.type == "cpu"


def _sdpa_mask(Q: int, K: int, device: torch.device, dtype: torch.dtype, call: AttnCall, rows: slice,
               cols: slice) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(mask, sees)``: the one mask (boolean, True = visible, or additive in the queries' ``dtype`` where cached:
    ``_band_mask``; broadcast to ``(B, H, len(rows), len(cols))``) that gives SDPA the visibility of the queries
    ``rows`` and keys ``cols`` of this call (``Q`` queries, ``K`` keys on ``device``): the dense mask and the key
    padding, with causality and the window folded in where a mask is present (SDPA takes ``is_causal`` only
    without one; the positions' rule is ``masks.positions_visible``, queries bottom-right aligned in the whole
    call).

    A row that sees no key must give zeros and zero gradients, as ours do; SDPA's CUDA backends return other
    values there (H200: relative error 0.16-0.81 against the reference, tests/test_gpu.py). Off the CPU such rows
    see every key inside SDPA (finite values and gradients) and ``sees`` (``(..., len(rows), 1)``, else ``None``)
    zeroes them after it."""
    mask = None if call.attn_mask is None else call.attn_mask[:, :, rows, cols]
    if call.key_padding_mask is not None:
        padding = call.key_padding_mask[:, None, None, cols]
        mask = padding if mask is None else mask & padding
    positional = call.window is not None or (call.causal and Q > 1 and (mask is not None or Q != K))
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    if positional and mask is None and shape[0] * shape[1] <= BAND_CACHE_MAX_ELEMENTS and host_may_wait():
        # the band alone: the same for every layer of a forward and every inner chunk (key offset relative to the
        # query's position), built once per shape instead of a dozen small ops per chunk and layer. Not while
        # torch.compile traces or a CUDA graph is captured (its kernels do not run then: the tensors would stay
        # unwritten); inference tensors only for inference mode (autograd may not save them).
        return _band_mask(device, dtype, *shape, cols.start - (rows.start + K - Q), call.causal, call.window,
                          torch.is_inference_mode_enabled())
    if positional:
        q_pos = torch.arange(rows.start, rows.stop, device=device) + (K - Q)
        band = positions_visible(q_pos[:, None], torch.arange(cols.start, cols.stop, device=device),
                                 causal=call.causal, window=call.window)
        mask = band if mask is None else mask & band
    return _zero_unseen(mask, device)


def _zero_unseen(mask: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(mask, sees)`` of ``_sdpa_mask`` for ``mask``: rows that see no key made to see every key, off the CPU."""
    if mask is None or sdpa_zeroes_unseen_rows(device):
        return mask, None
    sees = mask.any(-1, keepdim=True)
    return mask | ~sees, sees


# Band masks kept for reuse (``_band_mask``): up to 8 of at most 16M elements (the largest "sdpa-whole" mask: 32 MB
# in bf16 / fp16, 64 MB in fp32) each; a forward of one length needs about three per window (first chunk, inner
# chunks, last chunk) or one.
BAND_CACHE_MAX_ELEMENTS = SDPA_WINDOW_WHOLE_MAX


@functools.lru_cache(maxsize=8)
def _band_mask(device: torch.device, dtype: torch.dtype, n_rows: int, n_cols: int, shift: int, causal: bool,
               window: tuple[int, int] | None, inference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``_sdpa_mask``'s ``(mask, sees)`` of positions alone: query ``i`` at position ``i`` sees key ``j`` at
    position ``j + shift`` (causality, window). Windows are never negative, so a query whose own position lies
    among the keys sees at least that key: where that holds for every row, ``sees`` is ``None``. ``inference``
    (``torch.is_inference_mode_enabled()``) only keys the cache.

    The mask is additive, in the queries' ``dtype`` (0 where visible, -inf elsewhere): what SDPA makes of a
    boolean mask on every call (two more kernels per call), made once here; the same result bits. ``None`` where
    every key is visible to every query (one host wait per shape, which the cache keeps)."""
    band = positions_visible(torch.arange(n_rows, device=device)[:, None],
                             torch.arange(n_cols, device=device) + shift, causal=causal, window=window)
    if bool(band.all()):  # nothing to mask (a decode step over its window's keys): SDPA's unmasked kernels run
        return None, None
    sees = None
    if not (shift <= 0 and n_rows - 1 - shift < n_cols):
        band, sees = _zero_unseen(band, device)
    return torch.zeros(band.shape, dtype=dtype, device=device).masked_fill_(~band, float("-inf")), sees


def _run_layout(q, k, v, call: AttnCall, layout: BlockLayout, *, kernels: bool):
    from hf_ahfa.block_sparse import layout_band, sparse_kernels, sparse_reference

    if not kernels:
        return sparse_reference(q, k, v, layout, call)
    band = layout_band(call, layout.block_q, layout.block_k, call.max_q, call.max_k, q.device)
    resolved = layout.resolve(band, element_masks=call.element_masks, backward=call.needs_grad(q, k, v))
    return sparse_kernels(q, k, v, resolved, call)
