"""Triton helpers shared by every kernel family (flash forward and backward, split-KV decode, estimator).

The visibility rule of ``hf_ahfa.masks`` lives here once at element level (``visible``) and once at
block level (``key_span``, ``key_blocks``); ``finite_values`` / ``poison_seen`` keep a NaN or inf in an unseen
value away from the queries of a masked tile (decode always, flash forward/backward with ``NAN_GUARD``). Two bundles
keep the helpers' parameter lists short:

* ``Flags``: the compile-time switches of a launch, one ``tl.constexpr`` namedtuple that the kernels'
  ``@triton.heuristics(dict(F=flags))`` derives from their arguments (a feature is on when its tensor
  argument is not ``None``), so every ``if F.x:`` is resolved when the kernel is compiled;
* ``Ctx``: the runtime values one program needs to score and mask a tile, built once per program.

Tensors travel as tuples ``(tensor, *strides)``; a ``View`` is such a tensor narrowed to the rows of one
(batch, head): base pointer, row stride, column stride.
"""

import os
import re
from collections import namedtuple

import torch
import triton
import triton.language as tl

from hf_ahfa.kernels import configs
from hf_ahfa.kernels.configs import interpreting

LOG2E = tl.constexpr(1.4426950408889634)

Flags = namedtuple("Flags", "causal window softcap kpm am sinks varlen dropout sparse precision "
                            "d dv block_d block_dv layout_bq layout_bk guard skip alibi alibi_keys tma")

# AHFA_NAN_GUARD=1: the flash forward and backward keep a NaN or inf in an unseen key or value out of the rows
# of a masked tile that cannot see it (``finite_values``). Off by default: on the H200 it cost 10-140%, 15% even
# where no tile is masked (eval/results/kernel-cost-nan-v2-h200.md). The decode kernel always does it.
NAN_GUARD = os.environ.get("AHFA_NAN_GUARD", "0") == "1"
# AHFA_TMA: how the flash forward loads its key and value tiles on sm90+ (``tma_modes``). "auto" (default): through
# Hopper's tensor memory accelerator and through pointers, both as candidates that the autotuner times (TMA was
# 7-9% faster at D=64 on the H100 and the H200, as fast at D=128: kernels/NOTES.md); pointer loads also where a TMA
# variant does not fit. "1": TMA wherever the tensors allow it (the interpreter too: its tests);
# "0": pointers only. The interpreter loads through pointers unless "1".
TMA = os.environ.get("AHFA_TMA", "auto")
if TMA not in ("auto", "0", "1"):
    raise ValueError(f"AHFA_TMA must be auto, 0 or 1, got {TMA!r}")
# Triton releases whose TMA variants make ptxas crash (-11) on sm90, seconds of a process's first launch each
# before the autotuner skips the candidate (sm90, every table entry compiled offline with AHFA_TMA=1,
# scripts/compile_check.py; kernels/NOTES.md): before 3.7 every entry with num_stages=2 (3.6 also on the H100, in
# every process), before 3.6 the ALiBi variants too. So TMA from 3.6 on, and on 3.6 not at two stages.
TRITON_VERSION = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
TMA_TRITON = TRITON_VERSION >= (3, 6)
TMA_CRASH_STAGES = (2,) if TRITON_VERSION < (3, 7) else ()
# AHFA_ALIBI: how a causal call's ALiBi bias enters the scores of the flash forward and backward kernels.
# "distance": -slope * (query position - key position) per score (an int subtract, abs, conversion and FMA). "keys":
# the key's term alone, slope * (key position - the tile's first query position), one add per score: what it leaves
# out is constant along each row, so the softmax ignores it and the lse takes it back (``alibi_row_term``; the lse
# stored for the backward is the true one in either form, so each kernel may use its own). "fwd-keys" (default):
# the forward in the key-term form, the backward in the distance form. On the H100 (eval/results/alibi-forms-h100.md)
# the key-term forward ran at 0.99-1.04x the kernel without ALiBi (distance 0.93-0.99x), its backward at D=128 was
# 9% slower than the distance form's (as fast at D=64). The split-KV decode kernel follows the forward (one FMA per
# score: its rows carry their own slopes). The key-term form needs every visible key at or before its query: causal
# calls, and calls of one query (Transformers' decode steps, passed as not causal); other bidirectional calls keep
# the distance form. Every launch config passes with each form on the H100 (tests/test_gpu.py test_every_launch_config_is_right).
ALIBI_FORMS = ("fwd-keys", "distance", "keys")
ALIBI_FORM = os.environ.get("AHFA_ALIBI", ALIBI_FORMS[0])
if ALIBI_FORM not in ALIBI_FORMS:
    raise ValueError(f"AHFA_ALIBI must be one of {', '.join(ALIBI_FORMS)}, got {ALIBI_FORM!r}")


def alibi_keys(alibi: bool, causal: bool, q_len: int, backward: bool) -> bool:
    """Whether a forward (``backward`` False) or backward launch adds its ALiBi bias in the key-term form
    (``AHFA_ALIBI``): where no visible key lies after its query, in causal calls and in calls of one query (a
    decode step, which Transformers passes as not causal)."""
    return (alibi and (causal or q_len == 1)
            and (ALIBI_FORM == "keys" or (ALIBI_FORM == "fwd-keys" and not backward)))


# the scalar arguments of a launch; qk_scale has log2(e) folded in, win_left < 0 means no window; skip > 0: the
# forward may drop the P @ V product of tiles holding at most that share of each row's mass (``_fwd_step``)
Scores = namedtuple("Scores", "qk_scale softcap win_left win_right dropout_p seed skip", defaults=(0.0, 0, 0.0))
Ctx = namedtuple("Ctx", "q_len k_len qk_scale softcap win_left win_right kpm kpm_k kpm_lo kpm_hi kpm_run am am_q "
                        "am_k dropout_p seed bh skip slope")
View = namedtuple("View", "ptr row col")


# Host-side integer helpers for launch shapes. Not triton.cdiv / triton.next_power_of_2: in recent Triton
# releases those are constexpr functions whose host call costs ~10 us each, several per launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def block_size(n: int) -> int:
    """The tile width covering a head dim of ``n``."""
    return max(16, next_power_of_2(n))


def precision(dtype) -> str:
    """``tl.dot`` input precision: exact for float32 inputs, tf32 otherwise (where it applies at all)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tensor_arg(t):
    """A tensor as the kernels take it: ``(tensor, *strides)``."""
    return (t, *t.stride())


def tma_modes(k: torch.Tensor, v: torch.Tensor) -> tuple[bool, ...]:
    """The load modes (True: TMA descriptors made on the device) the flash forward may use for ``k`` and ``v``,
    in the order tried (``AHFA_TMA``). TMA needs sm90+, a unit last stride and 16-byte aligned base and strides;
    its descriptors live in a scratch buffer that Triton takes from the allocator set here. None before triton 3.6
    (``TMA_TRITON``)."""
    if TMA == "0" or (TMA == "auto" and interpreting()) or not TMA_TRITON:  # (3.6 has tl.make_tensor_descriptor)
        return (False,)
    if not interpreting() and configs.arch(k.device) != "sm90":
        return (False,)
    for t in (k, v):
        size = t.element_size()
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:3]):
            return (False,)
    triton.set_allocator(_scratch)
    return (True,) if TMA == "1" else (True, False)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cpu" if interpreting() else "cuda")


def mask_args(key_padding_mask, attn_mask):
    """Kernel arguments ``KPM, AM`` of the bool masks: uint8 views (no copy) with their strides, ``None``
    when absent; ``KPM`` also holds each batch row's span of visible keys (``visible_span``), outside which
    the kernels skip whole key blocks (and inside which, where it has no gap, they need no key-padding mask).
    Size-1 dims of the dense mask broadcast with stride 0."""
    kpm = None
    if key_padding_mask is not None:
        kpm = (*tensor_arg(key_padding_mask.view(torch.uint8)), visible_span(key_padding_mask))
    am = None
    if attn_mask is not None:
        am = (attn_mask.view(torch.uint8), *(0 if attn_mask.shape[i] == 1 else attn_mask.stride(i) for i in range(4)))
    return kpm, am


def visible_span(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` int32: per batch row of a ``(B, K)`` bool mask (True = visible) the first visible key, the last
    plus one (``(K, 0)`` where none is), and how many keys are visible: where that is the span's length, the span
    is one run (left or right padding, a static cache's filled head). Computed on the device: no wait for it (one
    small op more than the span alone: a static cache passes a new mask on every decode step)."""
    B, K = key_padding_mask.shape
    if K == 0:
        return torch.zeros(B, 3, dtype=torch.int32, device=key_padding_mask.device)
    idx = torch.arange(K, dtype=torch.int32, device=key_padding_mask.device)
    lo = torch.where(key_padding_mask, idx, K).amin(1)
    hi = torch.where(key_padding_mask, idx + 1, 0).amax(1)
    return torch.stack((lo, hi, key_padding_mask.sum(1, dtype=torch.int32)), 1)


def flags(args: dict) -> Flags:
    """``Flags`` of a launch from its arguments (used as ``@triton.heuristics(dict(F=flags))``)."""
    get = args.get
    d, dv = args["D"], get("DV", args["D"])
    f = Flags(
        causal=args["CAUSAL"], window=args["S"].win_left >= 0, softcap=args["S"].softcap > 0,
        kpm=get("KPM") is not None, am=get("AM") is not None, sinks=get("SINKS") is not None,
        varlen=get("CU") is not None, dropout=args["S"].dropout_p > 0, sparse=get("LISTS") is not None,
        precision=args["PRECISION"], d=d, dv=dv, block_d=block_size(d), block_dv=block_size(dv),
        layout_bq=get("LAYOUT_BQ", 1), layout_bk=get("LAYOUT_BK", 1), guard=NAN_GUARD, skip=args["S"].skip > 0,
        alibi=get("ALIBI") is not None, tma=get("TMA", False),
        alibi_keys=alibi_keys(get("ALIBI") is not None, args["CAUSAL"], get("T_Q"), backward="DELTA" in args),
    )
    if interpreting():
        return f  # plain values, as the interpreter passes every constexpr
    # compiled, each field a tl.constexpr like any constexpr argument: triton 3.6 hands an attribute of a
    # constexpr namedtuple on as a plain Python value and fails on one inside a tuple argument of a jit
    # function (``tl.zeros([BLOCK_N, F.block_d], ...)``: "'int' object has no attribute 'type'"). Made once per
    # distinct value: wrapping 19 fields on every launch was a visible share of a decode call's host time.
    wrapped = _WRAPPED_FLAGS.get(f)
    if wrapped is None:
        wrapped = _WRAPPED_FLAGS[f] = CompiledFlags(*(tl.constexpr(x) for x in f))
    return wrapped


class CompiledFlags(Flags):
    """``Flags`` as a compiled launch takes them, each field a ``tl.constexpr``; hashed once: Triton's launch and
    ours (``launch.py``) hash every launch's constexprs, and a ``tl.constexpr`` hashes in Python (~3 us for the
    21 fields on the CI machine)."""

    def __hash__(self):
        if "hash" not in self.__dict__:
            self.__dict__["hash"] = super().__hash__()
        return self.__dict__["hash"]


_WRAPPED_FLAGS: dict[Flags, CompiledFlags] = {}


@triton.jit
def head_view(T, b, h, start):
    """Rows ``start ..`` of batch row ``b``, head ``h`` of ``T = (tensor, stride_b, stride_t, stride_h, stride_d)``."""
    ptr, sb, st, sh, sd = T
    return View(ptr + b * sb + h.to(tl.int64) * sh + start * st, st, sd)


@triton.jit
def tile_ptrs(view, rows, cols):
    """[R] rows x [C] columns -> [R, C] pointers (row offsets in int64)."""
    return view.ptr + rows[:, None].to(tl.int64) * view.row + cols[None, :] * view.col


@triton.jit
def load_tile(view, rows, cols, n_rows, n_cols):
    """The [R, C] tile at ``rows`` x ``cols``, zero outside ``n_rows`` x ``n_cols``."""
    return tl.load(tile_ptrs(view, rows, cols), mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def store_tile(view, rows, cols, x, n_rows, n_cols):
    tl.store(tile_ptrs(view, rows, cols), x.to(view.ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def make_ctx(KPM, AM, S, b, h, q_start, k_start, q_len, k_len, bh, slope, F: tl.constexpr):
    """``Ctx`` of one (batch row, q head, sequence): the masks' pointers moved to its first (query, key);
    ``slope``: the head's ALiBi slope (``alibi_slope``)."""
    kpm = 0  # placeholders when off (never read): triton 3.6 cannot return a tuple holding None
    kpm_k = 0
    kpm_lo = 0
    kpm_hi = k_len
    kpm_run = 0
    am = 0
    am_q = 0
    am_k = 0
    if F.kpm:
        kpm, kpm_b, kpm_k, span = KPM
        kpm = kpm + b * kpm_b + k_start * kpm_k
        # the batch row's visible keys, relative to this sequence's first key
        first, end = tl.load(span + 3 * b), tl.load(span + 3 * b + 1)
        kpm_lo = tl.maximum(first - k_start, 0)
        kpm_hi = tl.minimum(end - k_start, k_len)
        kpm_run = (tl.load(span + 3 * b + 2) == end - first).to(tl.int32)  # no gap: as many visible as spanned
    if F.am:
        am, am_b, am_h, am_q, am_k = AM
        am = am + b * am_b + h.to(tl.int64) * am_h + q_start * am_q + k_start * am_k
    return Ctx(q_len, k_len, S.qk_scale, S.softcap, S.win_left, S.win_right, kpm, kpm_k, kpm_lo, kpm_hi, kpm_run, am,
               am_q, am_k, S.dropout_p, S.seed, bh, S.skip, slope)


@triton.jit
def alibi_slope(ALIBI, b, h, F: tl.constexpr):
    """The ALiBi slope of sequence ``b``, q head ``h`` (``ALIBI = (slopes, stride_b)``; 0 when off)."""
    slope = 0.0
    if F.alibi:
        ptr, stride_b = ALIBI
        slope = tl.load(ptr + b * stride_b + h).to(tl.float32)
    return slope


@triton.jit
def alibi_bias(s, qpos, start_n, BLOCK_N: tl.constexpr, slope, KEYS_HELD: tl.constexpr):
    """Scores ``s`` (log2 domain) of the key tile ``start_n + [0, BLOCK_N)`` minus ``slope * |query position - key
    position|``: ALiBi, as flash-attn defines it (``qpos`` bottom-right aligned); ``slope`` a scalar or ``[BM, 1]``.
    In loops over key tiles the distance is taken per row from the tile's first key and per column within the
    tile (loop-invariant): a score costs a subtraction and an absolute value, no integer conversion (sm90 SASS:
    the forward's unmasked loop 681 -> 581 instructions, 513 without ALiBi). ``KEYS_HELD``: the loop over query
    tiles of one key block (dk/dv), where that column vector, held across the loop, spilled registers: there the
    distance is taken per score."""
    c = slope * LOG2E
    if KEYS_HELD:
        return s - c * tl.abs(qpos[:, None] - (start_n + tl.arange(0, BLOCK_N))[None, :]).to(tl.float32)
    rows = (qpos - start_n).to(tl.float32)[:, None] * c
    return s - tl.abs(rows - tl.arange(0, BLOCK_N).to(tl.float32)[None, :] * c)


@triton.jit
def alibi_key_term(offs_m, offs_n, shift, slope):
    """The key-term form (``alibi_keys``): ``slope * (key position - ref)`` in the log2 domain, ``[BN]`` for a
    scalar ``slope`` (``[BM, BN]`` for ``[BM, 1]`` slopes, the decode kernel's rows), with ``ref`` the first query
    position of the tile ``offs_m`` (``shift`` = k_len - q_len: bottom-right aligned). Near the diagonal, where
    probabilities are not negligible, it stays within ``slope * (BM + BN)``: float32 loses nothing there."""
    ref = tl.min(offs_m, 0) + shift
    return (slope * LOG2E) * (offs_n - ref).to(tl.float32)


@triton.jit
def alibi_row_term(offs_m, slope):
    """What ``alibi_key_term`` adds to every score of row ``offs_m`` beyond the true ALiBi bias of a visible key,
    ``slope * (query position - ref)`` (log2 domain, ``[BM]``): subtract it from the row's max for the lse, add it
    to the lse (and to a sink's logit) wherever scores of the key-term form are compared with them."""
    return (slope * LOG2E) * (offs_m - tl.min(offs_m, 0)).to(tl.float32)


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
def logits(q, k, cx, F: tl.constexpr):
    """Scores of a tile in the log2 domain (scale, softcap) and the raw tanh for the softcap gradient.

    q: [R, D], k: [N, D] -> [R, N].
    """
    s = tl.dot(q, tl.trans(k), input_precision=F.precision)  # [R, D] @ [D, N] -> [R, N]
    t = s
    if F.softcap:
        t = _tanh(s * (cx.qk_scale / LOG2E) / cx.softcap)
        s = t * (cx.softcap * LOG2E)
    else:
        s = s * cx.qk_scale
    return s, t


@triton.jit
def visible(qp, kp, rows, n_rows, n_keys, am_rows, cx, F: tl.constexpr):
    """Which (query, key) pairs of a tile may attend: the one element-level rule of every kernel.

    qp: [R, 1] query positions (bottom-right aligned: query ``i`` sits at ``i + k_len - q_len``), rows: [R]
    row numbers of which the first ``n_rows`` exist, am_rows: [R] int64 row offsets into the dense mask;
    kp: [N] key positions (also the key-padding / dense-mask columns), of which those below ``n_keys``
    exist -> [R, N] bool.
    """
    inside = (rows[:, None] < n_rows) & (kp[None, :] < n_keys)
    ok = inside
    if F.causal:
        ok = ok & (kp[None, :] <= qp)
    if F.window:
        ok = ok & (kp[None, :] >= qp - cx.win_left) & (kp[None, :] <= qp + cx.win_right)
    if F.kpm:
        pad = tl.load(cx.kpm + kp.to(tl.int64) * cx.kpm_k, mask=kp < n_keys, other=0)
        ok = ok & (pad != 0)[None, :]
    if F.am:
        am = tl.load(cx.am + am_rows[:, None] + kp[None, :].to(tl.int64) * cx.am_k, mask=inside, other=0)
        ok = ok & (am != 0)
    return ok


@triton.jit
def finite_values(x):
    """A key or value tile with its non-finite elements zeroed, and which rows ([N] bool) held one.

    In a masked tile a query's probability at a key it cannot see is 0, but 0 * NaN is still NaN in P @ V and
    dS @ K: the zeroed tile keeps it out. Elementwise, after the load, so the loads keep their order."""
    bad = ~(tl.abs(x) < float("inf"))  # NaN fails the comparison too
    return tl.where(bad, 0.0, x).to(x.dtype), tl.max(bad.to(tl.int32), 1) > 0


@triton.jit
def poison_seen(acc, s, bad):
    """``acc`` [R, DV] with NaN rows where the row sees (score not -inf in ``s`` [R, N]) a key whose value
    was non-finite (``bad`` [N]): what it would have got without ``finite_values``."""
    seen = tl.max((bad[None, :] & (s != float("-inf"))).to(tl.int32), 1) > 0
    return tl.where(seen[:, None], float("nan"), acc)


@triton.jit
def key_span(first, end, cx, F: tl.constexpr):
    """Keys ``[lo, hi)`` that query positions ``[first, end)`` may see: the causal / window band."""
    lo = 0
    hi = cx.k_len
    if F.causal:
        hi = tl.minimum(hi, end)
    if F.window:
        lo = tl.maximum(0, first - cx.win_left)
        if not F.causal:
            hi = tl.minimum(hi, end + cx.win_right)
    return lo, tl.maximum(hi, 0)


@triton.jit
def key_blocks(first, end, cx, F: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[lo, hi)`` that query positions ``[first, end)`` may see, in whole ``BLOCK_N`` blocks from ``lo``,
    and inside them ``[f_lo, f_hi)``, the blocks every one of those queries fully sees. Only the blocks outside
    the latter (the causal diagonal, window edges, the ragged end) need a mask; with a dense mask every block does,
    with a key-padding mask every block but those wholly inside its visible span where that is one run. Positions
    are bottom-right aligned (query ``i`` sits at ``i + k_len - q_len``)."""
    lo, hi = key_span(first, end, cx, F)
    if F.kpm:  # key blocks wholly outside the batch row's visible span are skipped
        lo = tl.maximum(lo, cx.kpm_lo)
        hi = tl.minimum(hi, cx.kpm_hi)
    lo = (lo // BLOCK_N) * BLOCK_N
    f_hi = (cx.k_len // BLOCK_N) * BLOCK_N
    f_lo = lo
    if F.causal:
        f_hi = tl.minimum(f_hi, ((first + 1) // BLOCK_N) * BLOCK_N)
    if F.window:
        f_lo = tl.maximum(lo, tl.cdiv(end - 1 - cx.win_left, BLOCK_N) * BLOCK_N)
        if not F.causal:
            f_hi = tl.minimum(f_hi, ((first + cx.win_right + 1) // BLOCK_N) * BLOCK_N)
    if F.kpm:  # (selects, not branches: the span's ints may be wider than the band's)
        run = cx.kpm_run != 0
        f_lo = tl.where(run, tl.maximum(f_lo, tl.cdiv(cx.kpm_lo, BLOCK_N) * BLOCK_N), hi)
        f_hi = tl.where(run, tl.minimum(f_hi, (cx.kpm_hi // BLOCK_N) * BLOCK_N), f_hi)
    if F.am:
        f_lo = hi
    f_lo = tl.minimum(tl.maximum(f_lo, lo), hi)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), hi)
    return lo, f_lo, f_hi, hi


@triton.jit
def online_softmax(s, m_i, l_i, MASKED: tl.constexpr):
    """One online-softmax step over log2 scores s: [R, N] -> (p, rescale of the old sums, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new  # a fully visible tile gives every row a finite max
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def natural_lse(m_i, l_i):
    """Natural-log ``lse`` of rows with log2 max ``m_i`` and sum ``l_i`` (``-inf`` where a row sees nothing)."""
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    return tl.where(l_i > 0, (m_safe + tl.log2(tl.where(l_i > 0, l_i, 1.0))) / LOG2E, float("-inf"))
