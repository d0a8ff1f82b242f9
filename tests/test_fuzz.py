"""Differential fuzz of ``hf_ahfa.attention`` against the independent float64 oracle (issue 10, item 4).

Every example draws one call: shapes (batch 1-3, Q/K lengths including 0, 1, Q != K, odd lengths, head
dims that are not powers of two, GQA 1/2/4/7), the memory layout of every tensor argument (contiguous,
permuted as Transformers' ``(B, H, T, D)`` transpose, a strided slice of a bigger tensor whose other
elements are NaN/garbage, expanded with stride 0, or strided and permuted), windows (none, 1, huge up to
2**40, ``(0, x)``, ``(left, right)``), softcap (0.5 .. 1e4), sinks, key padding (with fully padded rows),
dense ``attn_mask``, packed batches with empty sequences (int32/int64, shared or ``(cu_q, cu_k)``,
strided), user ``BlockLayout``\\ s and adaptive policies with ``tau = density_limit = 1``. Each example runs
the reference backend (float32, float64) and the Triton backend (float32, float16; under
``TRITON_INTERPRET`` on the CPU) and compares output and lse, and for a subset the gradients of q, k, v
and sinks, with ``tests/conftest.py``'s oracle.

Tolerances are relative to the dtype's own error: the error of the same softmax computed naively in the
backend's compute precision with the probabilities and the output rounded through the storage dtype
(``_emulate``), times a small factor, plus a floor of a few units in the last place of the largest value.
A query that sees no key must give exactly 0 with ``lse = -inf``; NaN is never allowed.

The only errors accepted are the documented ones: ``layout`` with ``attn_mask`` or ``policy`` (ValueError
naming both), a layout whose blocks are not multiples of 16 on the Triton backend (ValueError naming the
block sizes) and bfloat16 under the interpreter (the forced backend raises, naming bfloat16).

Profiles: the fast one (default, CI: derandomized, small shapes, a few minutes on two CPU cores) and a long
one with ``AHFA_FUZZ=long`` (thousands of examples, fresh random seeds; ``AHFA_FUZZ_EXAMPLES=N`` sets the
count per test). ``test_gpu_fuzz`` (``-m gpu``) runs the same drawing at real tile shapes in bfloat16 and
float16 on CUDA and prints one summary line with the configurations per category.
"""

from __future__ import annotations

import collections
import math
import os
import random
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_ahfa

# the oracle is tests/conftest.py's (reached through its session fixture, see ``_summary``); nothing here imports
# hf_ahfa.reference or hf_ahfa.masks
ORACLE = {}

LONG = os.environ.get("AHFA_FUZZ", "fast") == "long"
ON_GPU = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
INF = float("inf")

# ---------------------------------------------------------------------------------------------- profiles


def fuzz_settings(fast: int, long: int):
    """``fast`` examples (derandomized: CI is reproducible) or, with AHFA_FUZZ=long, ``long`` examples
    from fresh seeds."""
    n = int(os.environ.get("AHFA_FUZZ_EXAMPLES", long if LONG else fast))
    return settings(max_examples=n, deadline=None, derandomize=not LONG, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


# categories seen per test, printed at the end of the module (and written to AHFA_FUZZ_LOG if set)
STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _summary(request, oracle):
    ORACLE["attention"], ORACLE["visible"] = oracle, oracle.__globals__["_visible"]
    yield
    if not STATS:
        return
    lines = [f"fuzz[{'long' if LONG else 'fast'}] {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items()))
             for name, c in sorted(STATS.items())]
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n" + "\n".join(lines), file=sys.stderr)
    if os.environ.get("AHFA_FUZZ_LOG"):
        with open(os.environ["AHFA_FUZZ_LOG"], "a") as f:
            f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- drawing


class HypothesisDraw:
    """The drawing interface over hypothesis' ``data`` (shrinks, prints every draw on failure)."""

    def __init__(self, data):
        self.data = data

    def int(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def choice(self, xs):
        return self.data.draw(st.sampled_from(list(xs)))

    def bool(self, p=0.5):
        # weighted coin; shrinks towards False (the feature off)
        return self.data.draw(st.integers(0, 999)) >= 1000 - p * 1000

    def float(self, lo, hi):
        return self.data.draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))


class RandomDraw(HypothesisDraw):
    """The same interface over ``random.Random`` (the GPU run: a plain counted loop)."""

    def __init__(self, seed):
        self.r = random.Random(seed)

    def int(self, lo, hi):
        return self.r.randint(lo, hi)

    def choice(self, xs):
        return self.r.choice(list(xs))

    def bool(self, p=0.5):
        return self.r.random() < p

    def float(self, lo, hi):
        return self.r.uniform(lo, hi)


# max_prog: a cap on batch rows (or sequences) x heads x 16-query tiles, the interpreter's cost
CPU_SHAPES = dict(maxlen=80 if LONG else 40, dims=(8, 16, 24, 40, 80), max_bh=16 if LONG else 8,
                  max_prog=40 if LONG else 10)
GPU_SHAPES = dict(maxlen=1100, dims=(64, 80, 128, 256), max_bh=32, max_prog=10**9)
GPU_EDGES = (1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 1100)


def _length(d, shapes):
    m = shapes["maxlen"]
    kind = d.choice(["zero", "one", "small", "odd", "any", "any", "edge"] if shapes is GPU_SHAPES
                    else ["zero", "one", "small", "odd", "any", "any"])
    if kind == "zero":
        return 0
    if kind == "one":
        return 1
    if kind == "small":
        return d.int(2, 8)
    if kind == "odd":
        return 2 * d.int(1, (m - 1) // 2) + 1
    if kind == "edge":
        return d.choice(GPU_EDGES)
    return d.int(0, m)


def _heads(d, shapes):
    g = d.choice([1, 2, 4, 7])
    hkv = 1 if g == 7 else d.choice([1, 2] if shapes is CPU_SHAPES else [1, 2, 4])
    return hkv * g, hkv


def _window(d, K):
    kind = d.choice(["none", "none", "none", "one", "int", "huge", "left0", "pair"])
    big = max(K, 1)
    if kind == "none":
        return None
    if kind == "one":
        return 1
    if kind == "int":
        return d.int(1, big + 2)
    if kind == "huge":
        return d.choice([2**31 - 1, 2**31, 2**40, big + d.int(0, 3)])
    if kind == "left0":
        return (0, d.choice([0, 1, d.int(0, big + 2), 2**40]))
    return (d.choice([0, d.int(0, big + 2), 2**40]), d.choice([0, d.int(0, big + 2), 2**40]))


FLOAT_KINDS = ["contig", "contig", "permuted", "strided", "expanded", "strided+permuted"]


def draw_call(d, shapes, *, packed=None, mask=True, min_q=0):
    """One call's configuration (a dict of plain values; tensors are built from it by ``build``)."""
    c = {"seed": d.int(0, 2**31 - 1)}
    c["Hq"], c["Hkv"] = _heads(d, shapes)
    c["D"] = d.choice(shapes["dims"])
    c["Dv"] = c["D"] if d.bool(0.8) else d.choice(shapes["dims"])
    c["packed"] = d.bool(0.25) if packed is None else packed
    if c["packed"]:
        c["B"] = 1
        n = d.int(1, max(1, min(4, shapes["max_prog"] // c["Hq"])))
        m = max(shapes["maxlen"] // n, 1)
        m = min(m, 16 * max(1, shapes["max_prog"] // (n * c["Hq"])))
        q_lens = [d.choice([0, 1, d.int(0, m), d.int(0, m)]) for _ in range(n)]
        if d.bool(0.5):
            k_lens = list(q_lens)
        else:
            k_lens = [d.choice([ql, ql + d.int(0, m), d.int(0, m)]) for ql in q_lens]
        c["q_lens"], c["k_lens"] = q_lens, k_lens
        c["cu_pair"] = k_lens != q_lens or d.bool(0.3)
        c["cu_dtype"] = d.choice(["int32", "int64"])
        c["cu_kind"] = d.choice(["contig", "strided"])
        c["Q"], c["K"] = sum(q_lens), sum(k_lens)
    else:
        bh_cap = max(shapes["max_bh"] // c["Hq"], 1)
        c["B"] = d.int(1, min(3, bh_cap))
        c["Q"] = max(_length(d, shapes), min_q)
        tiles = lambda: c["B"] * c["Hq"] * max(1, -(-c["Q"] // 16))  # noqa: E731
        while tiles() > shapes["max_prog"] and c["B"] > 1:
            c["B"] -= 1
        if tiles() > shapes["max_prog"]:
            c["Q"] = max(min(c["Q"], 16 * max(1, shapes["max_prog"] // (c["B"] * c["Hq"]))), min_q)
        rel = d.choice(["same", "more", "fewer", "free"])
        c["K"] = {"same": c["Q"], "more": c["Q"] + d.int(1, max(shapes["maxlen"] // 2, 1)),
                  "fewer": d.int(0, max(c["Q"] - 1, 0)), "free": _length(d, shapes)}[rel]
    c["causal"] = d.bool()
    c["window"] = _window(d, c["K"])
    c["softcap"] = None if d.bool(0.6) else math.exp(d.float(math.log(0.5), math.log(1e4)))
    c["scale"] = None if d.bool(0.8) else d.float(0.05, 1.0)
    c["qmult"] = d.choice([0.5, 1.0, 1.0, 3.0])
    c["sinks"] = None if d.bool(0.7) else d.choice(FLOAT_KINDS[:4])
    c["sinks_dtype"] = d.choice(["q", "float32"])
    for name in "qkv":
        c[f"{name}_kind"] = d.choice(FLOAT_KINDS)
    c["kpm"] = None
    c["attn_mask"] = None
    if mask and d.bool(0.3):
        c["kpm"] = d.choice(["random", "left", "rows"])  # rows: some batch rows wholly padded
        c["kpm_kind"] = d.choice(["contig", "strided", "expanded", "permuted"])
    if mask and d.bool(0.25):
        c["attn_mask"] = d.choice([0.3, 0.7, 0.95])
        c["am_b"] = d.choice([1, c["B"]])
        c["am_h"] = d.choice([1, c["Hq"]])
        c["am_kind"] = d.choice(["contig", "strided", "expanded", "permuted"])
    # ALiBi from its own generator (seeded by the call's seed): the draws above, and so every configuration
    # index printed by an earlier failure, stay what they were before ALiBi was fuzzed
    rng = random.Random(c["seed"] * 7 + 1)
    c["alibi"] = None
    if rng.random() < 0.25:
        rows = len(c["q_lens"]) if c["packed"] else c["B"]
        c["alibi_per_row"] = rng.random() < 0.5
        c["alibi"] = [[rng.uniform(0.0, 0.5) for _ in range(c["Hq"])] for _ in range(rows if c["alibi_per_row"] else 1)]
    return c


# ---------------------------------------------------------------------------------------------- building


class Recipe:
    """A tensor argument as a base tensor and the view of it the call receives: the same structure is
    rebuilt in every dtype, and gradients are read from the base (the leaf)."""

    def __init__(self, base, fn):
        self.base, self.fn = base, fn

    def make(self, dtype=None, device="cpu", grad=False):
        leaf = self.base.to(device=device, dtype=dtype or self.base.dtype).clone().requires_grad_(grad)
        return leaf, self.fn(leaf)


def _garbage(shape, like):
    if like.dtype == torch.bool:  # a pattern of both values, so that reading it anywhere shows
        return torch.arange(math.prod(shape)).view(shape) % 3 == 0
    if like.is_floating_point():
        return torch.full(shape, float("nan"), dtype=like.dtype)
    return torch.full(shape, 10**6, dtype=like.dtype)  # an offset far out of range


def _strided(vals, dim, step, off):
    S = list(vals.shape)
    big = S.copy()
    big[dim] = S[dim] * step + off
    idx = (slice(None),) * dim + (slice(off, off + S[dim] * step, step),)
    base = _garbage(big, vals)
    base[idx] = vals
    return base, lambda t: t[idx]


def recipe(d, shape, gen, kind, *, transformers_perm=False):
    """``gen(shape) -> float64/bool/int tensor``; ``kind`` one of contig, permuted, strided, expanded,
    strided+permuted."""
    n = len(shape)
    if kind == "expanded":
        dim = d.int(0, n - 1)
        small = list(shape)
        small[dim] = 1
        return Recipe(gen(small), lambda t: t.expand(*shape))
    vals = gen(list(shape))
    if kind == "contig" or n == 1 and kind == "permuted":
        return Recipe(vals, lambda t: t)
    perm = None
    if "permuted" in kind and n > 1:
        perm = [0, 2, 1, 3] if transformers_perm and d.bool(0.6) else None
        if perm is None:
            perm = list(range(n))
            for i in range(n - 1, 0, -1):  # Fisher-Yates through the drawer
                j = d.int(0, i)
                perm[i], perm[j] = perm[j], perm[i]
        inv = sorted(range(n), key=lambda i: perm[i])
        vals_p = vals.permute(*perm).contiguous()
    if "strided" in kind:
        src = vals_p if perm is not None else vals
        dim = d.int(0, n - 1)
        base, fn = _strided(src, dim, d.choice([2, 3]), d.int(0, 1))
    else:
        base, fn = vals_p, lambda t: t
    if perm is None:
        return Recipe(base, fn)
    return Recipe(base, lambda t: fn(t).permute(*inv))


def build(d, c, round_dtype=torch.float16):
    """Tensors of a configuration: ``Recipe``\\ s of q, k, v, sinks, kpm, attn_mask, cu. Float values are
    rounded through ``round_dtype`` so that every run dtype at least as precise sees the same numbers."""
    g = torch.Generator().manual_seed(c["seed"])

    def normal(mult=1.0):
        return lambda s: (torch.randn(s, generator=g, dtype=torch.float64) * mult).to(round_dtype).double()

    B, Q, K, Hq, Hkv = c["B"], c["Q"], c["K"], c["Hq"], c["Hkv"]
    r = {
        "q": recipe(d, (B, Q, Hq, c["D"]), normal(c["qmult"]), c["q_kind"], transformers_perm=True),
        "k": recipe(d, (B, K, Hkv, c["D"]), normal(), c["k_kind"], transformers_perm=True),
        "v": recipe(d, (B, K, Hkv, c["Dv"]), normal(), c["v_kind"], transformers_perm=True),
    }
    if c["sinks"] is not None:
        r["sinks"] = recipe(d, (Hq,), normal(3.0), c["sinks"])
    if c["kpm"] is not None:
        kind = c["kpm"]

        def kpm(s):
            if kind == "random":
                m = torch.rand(s, generator=g) < 0.7
            elif kind == "left":
                pad = torch.randint(0, s[1] + 1, (s[0], 1), generator=g)
                m = torch.arange(s[1])[None] >= pad
            else:
                m = torch.rand(s, generator=g) < 0.8
                m &= torch.rand(s[0], 1, generator=g) < 0.5  # some rows wholly padded
            return m

        r["kpm"] = recipe(d, (B, K), kpm, c["kpm_kind"])
    if c["attn_mask"] is not None:
        p = c["attn_mask"]

        def am(s):
            m = torch.rand(s, generator=g) < p
            if s[2] and d.bool(0.3):
                m[..., torch.randint(0, s[2], (1,), generator=g), :] = False  # a fully masked query
            return m

        r["attn_mask"] = recipe(d, (c["am_b"], c["am_h"], Q, K), am, c["am_kind"])
    if c["packed"]:
        dt = getattr(torch, c["cu_dtype"])
        offs = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=dt)  # noqa: E731
        kind = c["cu_kind"]
        r["cu_q"] = recipe(d, (len(c["q_lens"]) + 1,), lambda s: offs(c["q_lens"]), kind)
        if c["cu_pair"]:
            r["cu_k"] = recipe(d, (len(c["k_lens"]) + 1,), lambda s: offs(c["k_lens"]), d.choice(["contig", "strided"]))
    return r


def call_kwargs(c, views):
    kw = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"], scale=c["scale"],
              sinks=views.get("sinks"), key_padding_mask=views.get("kpm"), attn_mask=views.get("attn_mask"))
    if c["packed"]:
        kw["cu_seqlens"] = (views["cu_q"], views["cu_k"]) if c["cu_pair"] else views["cu_q"]
    if c.get("alibi") is not None:
        slopes = torch.tensor(c["alibi"], dtype=torch.float32, device=views["q"].device)
        kw["alibi_slopes"] = slopes if c["alibi_per_row"] else slopes[0]
    return kw


def _alibi_bias(c, device, dtype):
    """``-slope * |query position - key position|`` as ``(B|1, Hq, Q, K)``, per sequence when packed."""
    slopes = torch.tensor(c["alibi"], dtype=dtype, device=device)  # (rows or 1, Hq)

    def bias(ql, kl, row):
        dist = (torch.arange(ql, device=device)[:, None] + (kl - ql) - torch.arange(kl, device=device)[None, :]).abs()
        return -row[..., None, None] * dist.to(dtype)

    if not c["packed"]:
        return bias(c["Q"], c["K"], slopes)
    out = torch.zeros(1, c["Hq"], c["Q"], c["K"], dtype=dtype, device=device)
    a = b = 0
    for i, (ql, kl) in enumerate(zip(c["q_lens"], c["k_lens"] if c["cu_pair"] else c["q_lens"])):
        out[0, :, a:a + ql, b:b + kl] = bias(ql, kl, slopes[i if c["alibi_per_row"] else 0])
        a, b = a + ql, b + kl
    return out


def views_of(recipes, dtype, device="cpu", grad=False, sinks_dtype=None):
    """``(leaves, views)``: float tensors in ``dtype`` (sinks in ``sinks_dtype``), masks and offsets as drawn."""
    leaves, views = {}, {}
    for name, rc in recipes.items():
        if name in "qkv":
            leaves[name], views[name] = rc.make(dtype, device, grad)
        elif name == "sinks":
            leaves[name], views[name] = rc.make(sinks_dtype or dtype, device, grad)
        else:
            leaves[name], views[name] = rc.make(None, device)
    return leaves, views


# ---------------------------------------------------------------------------------------------- visibility


def positional(Qs, Ks, causal, window, device="cpu"):
    """The README's positional rules for one sequence, vectorised: bool ``(Q, K)``."""
    i = torch.arange(Qs, device=device)[:, None]
    j = torch.arange(Ks, device=device)[None, :]
    p = i + (Ks - Qs)
    ok = torch.ones(Qs, Ks, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= p
    if isinstance(window, int):
        ok &= (p - window < j) if causal else ((p - j).abs() < window)
    elif window is not None:
        ok &= (p - window[0] <= j) & (j <= p + (0 if causal else window[1]))
    return ok


def visibility(c, views, extra=None):
    """The bool ``(B, Hq, Q, K)`` set of visible pairs, vectorised from the README's table (independent of
    hf_ahfa.masks; ``test_visibility_matches_oracle`` checks it against the oracle's loop). ``extra``: a
    further ``(B|1, Hq|1, Q, K)`` mask (a layout's tokens)."""
    B, Q, K, Hq = c["B"], c["Q"], c["K"], c["Hq"]
    dev = views["q"].device

    if c["packed"]:
        ok = torch.zeros(Q, K, dtype=torch.bool, device=dev)
        a = b = 0
        for ql, kl in zip(c["q_lens"], c["k_lens"] if c["cu_pair"] else c["q_lens"]):
            ok[a:a + ql, b:b + kl] = positional(ql, kl, c["causal"], c["window"], dev)
            a, b = a + ql, b + kl
    else:
        ok = positional(Q, K, c["causal"], c["window"], dev)
    ok = ok[None, None]
    if views.get("kpm") is not None:
        ok = ok & views["kpm"][:, None, None, :]
    for m in (views.get("attn_mask"), extra):
        if m is not None:
            ok = ok & m
    return ok.expand(B, Hq, Q, K)


def _emulate(views, ok, c, dtype):
    """The softmax attention computed naively in ``dtype``'s compute precision (float32; float64 for float64)
    with the probabilities and the output rounded through ``dtype``: the error any correct implementation
    in ``dtype`` has. Differentiable (the roundings too). Returns ``(out, lse)``."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = (views[n].to(ct) for n in "qkv")
    g = c["Hq"] // c["Hkv"]
    qd = q.transpose(1, 2)
    kd = k.transpose(1, 2).repeat_interleave(g, 1)
    vd = v.transpose(1, 2).repeat_interleave(g, 1)
    scale = c["scale"] if c["scale"] is not None else c["D"] ** -0.5
    s = qd @ kd.transpose(-1, -2) * scale
    if c["softcap"] is not None:
        s = c["softcap"] * torch.tanh(s / c["softcap"])
    if c.get("alibi") is not None:
        s = s + _alibi_bias(c, s.device, ct)
    s = s.masked_fill(~ok, -INF)
    m = s.amax(-1, keepdim=True).detach() if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(m.isfinite(), m, 0.0)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    lse = (m + torch.log(den)).squeeze(-1).float()
    if views.get("sinks") is not None:
        den = den + torch.exp(views["sinks"].to(ct).view(1, -1, 1, 1) - m)
    p = e / torch.where(den > 0, den, 1.0)
    out = (p.to(dtype).to(ct) @ vd).transpose(1, 2).to(dtype)
    return out, lse


# ---------------------------------------------------------------------------------------------- comparison

EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# allowed error / the dtype's own error (what _emulate's roundings cost); floor in units of EPS * max|value|
# for when the emulation happens to round exactly (float64): gradients go through two products and a
# reduction over keys and head dims, whose summation order differs between implementations
FACTOR = {"out": 4.0, "lse": 8.0, "grad": 8.0}
FLOOR = {"out": 4.0, "lse": 16.0, "grad": 64.0}
TERM_FLOOR = 8.0  # units of EPS * the size of the terms a gradient sums (see compare_grads)


def _err(a, b):
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    both = a.isfinite() & b.isfinite()
    return (a[both] - b[both]).abs().max().item() if both.any() else 0.0


def _amax(x):
    return x[x.isfinite()].abs().max().item() if x.numel() and x.isfinite().any() else 0.0


def _tolerance(what, emu, want, dtype):
    own = _err(emu, want)
    return FACTOR[what] * own + FLOOR[what] * EPS[dtype] * max(1.0, _amax(want))


def compare(tag, got_out, got_lse, want_out, want_lse, emu_out, emu_lse, dtype, info):
    """Output and lse against the oracle; fully masked rows exact; never NaN."""
    assert not got_out.isnan().any(), f"{tag}: NaN in the output\n{info}"
    assert not got_lse.isnan().any(), f"{tag}: NaN in lse\n{info}"
    assert got_out.shape == want_out.shape and got_lse.shape == want_lse.shape, f"{tag}: shapes\n{info}"
    assert got_lse.dtype == torch.float32, f"{tag}: lse dtype {got_lse.dtype}"
    dead = want_lse.isneginf()  # (B, H, Q): rows that see no key
    got_dead = got_lse.isneginf()
    assert torch.equal(dead, got_dead), f"{tag}: lse -inf on {int(got_dead.sum())} rows, oracle {int(dead.sum())}\n{info}"
    assert got_lse.isfinite()[~dead].all(), f"{tag}: non-finite lse on a visible row\n{info}"
    dead_out = dead.transpose(1, 2)[..., None].expand_as(got_out)
    assert (got_out[dead_out] == 0).all(), f"{tag}: fully masked rows are not exactly 0\n{info}"
    err = _err(got_out, want_out)
    tol = _tolerance("out", emu_out, want_out, dtype)
    assert err <= tol, f"{tag}: out error {err:.3e} > {tol:.3e} (own {_err(emu_out, want_out):.2e})\n{info}"
    err = _err(got_lse, want_lse)
    tol = _tolerance("lse", emu_lse, want_lse, torch.float32)
    assert err <= tol, f"{tag}: lse error {err:.3e} > {tol:.3e}\n{info}"


def _term_scale(views, gout, c) -> float:
    """The size of the terms that the gradients of q and k sum, and that can cancel: the largest |dO . v| (over
    every query/key pair and head pair, an upper bound), times the score scale and the largest |q| or |k| (the
    softcap only shrinks them)."""
    def rows(x):
        x = x.double().flatten(0, 2)
        return x[x.isfinite().all(-1)]

    do, v = rows(gout), rows(views["v"])
    if not do.numel() or not v.numel():
        return 0.0
    scale = c["scale"] if c["scale"] is not None else c["D"] ** -0.5
    return (do @ v.T).abs().max().item() * scale * max(_amax(views["q"].double()), _amax(views["k"].double()))


def compare_grads(tag, got, want, emu, dtype, info, term_scale=0.0):
    """``term_scale`` (``_term_scale``): where the gradient cancels to ~0 (e.g. a key that is the only one its
    queries see: its gradient is exactly 0) and the emulation happens to round to exactly the oracle, the
    tolerance has to cover the rounding noise of the cancelling terms themselves: TERM_FLOOR units of them."""
    for name in got:
        a, b, e = got[name], want[name], emu[name]
        assert a is not None, f"{tag}: no gradient for {name}\n{info}"
        assert not a.isnan().any() or b.isnan().any(), f"{tag}: NaN in d{name}\n{info}"
        finite = ~b.isnan()  # strided leaves: the oracle's garbage elements get zero gradients too
        a, b, e = a[finite], b[finite], e[finite]
        err = _err(a, b)
        tol = _tolerance("grad", e, b, dtype)
        if _err(e, b) == 0:
            tol = max(tol, TERM_FLOOR * EPS[dtype] * term_scale)
        assert err <= tol, f"{tag}: d{name} error {err:.3e} > {tol:.3e} (own {_err(e, b):.2e})\n{info}"


# ---------------------------------------------------------------------------------------------- running

CPU_RUNS = [("reference", torch.float64), ("reference", torch.float32), ("triton", torch.float32),
            ("triton", torch.float16)]
GRAD_RUNS = [("reference", torch.float64), ("reference", torch.float32), ("triton", torch.float32),
             ("triton", torch.float16)]


def documented_error(c, backend, dtype, layout, policy, with_mask):
    """``(exception type, words)`` the README documents for this combination, or None."""
    if layout is not None and (policy is not None or with_mask):
        return ValueError, ("layout", "policy" if policy is not None else "attn_mask")
    if backend == "triton" and dtype == torch.bfloat16 and INTERPRETING:
        return RuntimeError, ("backend", "bfloat16")
    if backend == "triton" and layout is not None and (layout.block_q % 16 or layout.block_k % 16):
        return ValueError, ("block sizes",)
    return None


def _describe(c, extra=""):
    keys = [k for k in c if k != "seed"]
    return "config: " + ", ".join(f"{k}={c[k]!r}" for k in keys) + f", seed={c['seed']}" + extra


def run_example(d, c, recipes, runs, *, grad=False, layout=None, layout_tokens=None, policy=None, device="cpu",
                stats=None, round_dtypes=None):
    """Run ``c`` on every (backend, dtype) of ``runs`` and compare with the oracle. ``layout_tokens``:
    the layout's token mask ``(B, Hq, Q, K)`` the oracle sees as an extra attn_mask."""
    info = _describe(c)
    gout = None
    oracle_cache = {}
    for backend, dtype in runs:
        rd = (round_dtypes or {}).get(dtype, "cpu")
        sd = torch.float32 if c["sinks_dtype"] == "float32" and dtype != torch.float64 else dtype
        leaves, views = views_of(recipes[rd] if round_dtypes else recipes, dtype, device, grad, sd)
        kw = call_kwargs(c, views)
        want_err = documented_error(c, backend, dtype, layout, policy, views.get("attn_mask") is not None)
        tag = f"{backend}/{str(dtype)[6:]}"
        if want_err is not None:
            exc, words = want_err
            with pytest.raises(exc) as raised:
                hf_ahfa.attention(views["q"], views["k"], views["v"], backend=backend, layout=layout, policy=policy,
                                  return_lse=True, **kw)
            msg = str(raised.value)
            assert all(w in msg for w in words), f"{tag}: {exc.__name__} without {words}: {msg}\n{info}"
            if stats is not None:
                stats[f"rejected:{words[0]}"] += 1
            continue
        out, lse = hf_ahfa.attention(views["q"], views["k"], views["v"], backend=backend, layout=layout,
                                     policy=policy, return_lse=True, **kw)
        # the oracle on exactly these inputs, as float64 (cached per set of rounded values)
        if rd not in oracle_cache:
            o_leaves, o_views = views_of(recipes[rd] if round_dtypes else recipes, torch.float64, device, grad)
            ok = visibility(c, o_views, layout_tokens)
            okw = call_kwargs(c, o_views)
            if layout_tokens is not None:
                okw["attn_mask"] = layout_tokens if okw["attn_mask"] is None else okw["attn_mask"] & layout_tokens
            if c["packed"] and "cu_seqlens" in okw:
                cq = o_views["cu_q"].contiguous()
                okw["cu_seqlens"] = (cq, o_views["cu_k"].contiguous()) if c["cu_pair"] else cq
            w_out, w_lse = ORACLE["attention"](o_views["q"], o_views["k"], o_views["v"], **okw)
            w_grads = None
            if grad:
                if gout is None:
                    gg = torch.Generator().manual_seed(c["seed"] + 1)
                    gout = torch.randn(w_out.shape, generator=gg, dtype=torch.float64).to(device)
                names = [n for n in ("q", "k", "v", "sinks") if n in o_leaves]
                w_grads = dict(zip(names, torch.autograd.grad(w_out, [o_leaves[n] for n in names], gout,
                                                              allow_unused=True)))
                w_grads = {n: (torch.zeros_like(o_leaves[n]) if gr is None else gr) for n, gr in w_grads.items()}
            oracle_cache[rd] = (w_out.detach(), w_lse.detach(), w_grads, ok)
        w_out, w_lse, w_grads, ok = oracle_cache[rd]
        e_leaves, e_views = views_of(recipes[rd] if round_dtypes else recipes, dtype, device, grad, sd)
        e_out, e_lse = _emulate(e_views, ok, c, dtype)
        compare(tag, out, lse, w_out, w_lse, e_out.detach(), e_lse, dtype, info)
        if stats is not None:
            stats[f"run:{tag}"] += 1
        if grad:
            names = [n for n in ("q", "k", "v", "sinks") if n in leaves]
            g = gout.to(out.dtype)
            got = torch.autograd.grad(out, [leaves[n] for n in names], g, allow_unused=True)
            got = {n: (torch.zeros_like(leaves[n]) if gr is None else gr) for n, gr in zip(names, got)}
            emu = torch.autograd.grad(e_out, [e_leaves[n] for n in names], gout.to(e_out.dtype), allow_unused=True)
            emu = {n: (torch.zeros_like(e_leaves[n]) if gr is None else gr) for n, gr in zip(names, emu)}
            compare_grads(tag, got, w_grads, emu, dtype, info, _term_scale(e_views, gout, c))
            if stats is not None:
                stats[f"grad:{tag}"] += 1


def categories(c, stats):
    """Count what an example covers."""
    stats["examples"] += 1
    if c.get("alibi") is not None:
        stats["alibi per row" if c["alibi_per_row"] else "alibi"] += 1
    if c["Q"] == 0 or c["K"] == 0:
        stats["empty Q or K"] += 1
    if c["Q"] == 1 or c["K"] == 1:
        stats["length 1"] += 1
    if c["Q"] != c["K"]:
        stats["Q != K"] += 1
    if c["Hq"] != c["Hkv"]:
        stats[f"gqa {c['Hq'] // c['Hkv']}"] += 1
    if c["D"] & (c["D"] - 1):
        stats["non-pow2 head dim"] += 1
    if c["Dv"] != c["D"]:
        stats["Dv != D"] += 1
    if c["packed"]:
        stats["packed"] += 1
        if 0 in c["q_lens"] or 0 in c["k_lens"]:
            stats["packed with empty sequence"] += 1
        if c["cu_kind"] != "contig":
            stats["strided cu_seqlens"] += 1
    kinds = {c[f"{n}_kind"] for n in "qkv"}
    for k in ("permuted", "strided", "expanded"):
        if any(k in kk for kk in kinds):
            stats[f"{k} q/k/v"] += 1
    if c["causal"]:
        stats["causal"] += 1
    w = c["window"]
    if w is not None:
        stats["window " + ("int" if isinstance(w, int) else "pair")] += 1
        if max(w if isinstance(w, tuple) else (w,)) >= 2**31 - 1:
            stats["window >= 2^31"] += 1
    if c["softcap"] is not None:
        stats["softcap"] += 1
        if c["softcap"] > 1000:
            stats["softcap > 1e3"] += 1
    if c["sinks"] is not None:
        stats["sinks"] += 1
        if c["sinks"] != "contig":
            stats["sinks " + c["sinks"]] += 1
    if c["kpm"] is not None:
        stats["key padding"] += 1
    if c["attn_mask"] is not None:
        stats["attn_mask"] += 1


def _dead_rows(c, recipes):
    _, views = views_of(recipes, torch.float64)
    ok = visibility(c, views)
    return bool((~ok.any(-1)).any()) if ok.numel() else False


# ---------------------------------------------------------------------------------------------- CPU tests


@fuzz_settings(fast=60, long=2000)
@given(data=st.data())
def test_dense_fuzz(data):
    """Exact attention, every argument: reference float64/float32 and Triton float32/float16."""
    d = HypothesisDraw(data)
    c = draw_call(d, CPU_SHAPES)
    recipes = build(d, c)
    stats = STATS["dense"]
    categories(c, stats)
    if _dead_rows(c, recipes):
        stats["has fully masked rows"] += 1
    runs = list(CPU_RUNS)
    if d.bool(0.05):
        runs.append(("triton", torch.bfloat16))  # documented: the forced backend raises under the interpreter
    run_example(d, c, recipes, runs, stats=stats)


@fuzz_settings(fast=15, long=1000)
@given(data=st.data())
def test_gradient_fuzz(data):
    """Gradients of q, k, v and sinks (leaves: the base tensors of strided/expanded/permuted views)."""
    d = HypothesisDraw(data)
    c = draw_call(d, dict(CPU_SHAPES, maxlen=CPU_SHAPES["maxlen"] * 3 // 4))
    recipes = build(d, c)
    stats = STATS["grad"]
    categories(c, stats)
    run_example(d, c, recipes, GRAD_RUNS, grad=True, stats=stats)


def draw_layout(d, c, *, multiple_of_16=True, device="cpu"):
    """A user layout per batch row (or per packed sequence) and its token mask ``(B, Hq, Q, K)`` built from
    the drawn blocks (cross-checked with ``to_token_mask``)."""
    bq = d.choice([16, 32, 48]) if multiple_of_16 else d.choice([7, 16, 24])
    bk = d.choice([16, 32, 48]) if multiple_of_16 else d.choice([5, 16, 24])
    if c["packed"]:
        rows, q_len = len(c["q_lens"]), max(c["q_lens"])
        k_len = max(c["k_lens"] if c["cu_pair"] else c["q_lens"])
    else:
        rows, q_len, k_len = c["B"], c["Q"], c["K"]
    nq, nk = -(-q_len // bq), -(-k_len // bk)
    g = torch.Generator().manual_seed(c["seed"] + 7)
    density = d.choice([0.0, 0.3, 0.6, 0.9, 1.0])
    blocks = torch.rand(rows, c["Hq"], nq, nk, generator=g) < density
    full = None
    if d.bool(0.5):
        full = blocks & (torch.rand(rows, c["Hq"], nq, nk, generator=g) < 0.5)
    blocks = blocks.to(device)
    full = None if full is None else full.to(device)
    layout = hf_ahfa.BlockLayout.from_dense(blocks, bq, bk, q_len, k_len, full=full)
    tok = blocks.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :q_len, :k_len]
    assert torch.equal(layout.to_token_mask(), tok)
    if c["packed"]:
        mask = torch.zeros(1, c["Hq"], c["Q"], c["K"], dtype=torch.bool, device=device)
        a = b = 0
        for s, (ql, kl) in enumerate(zip(c["q_lens"], c["k_lens"] if c["cu_pair"] else c["q_lens"])):
            mask[0, :, a:a + ql, b:b + kl] = tok[s, :, :ql, :kl]
            a, b = a + ql, b + kl
        tok = mask
    return layout, tok


@fuzz_settings(fast=30, long=1000)
@given(data=st.data())
def test_layout_fuzz(data):
    """User BlockLayouts: keys outside the layout count as masked (the oracle gets the token mask)."""
    d = HypothesisDraw(data)
    c = draw_call(d, CPU_SHAPES, mask=True)
    stats = STATS["layout"]
    invalid = d.choice([None] * 12 + ["attn_mask", "policy", "block size"])
    if invalid != "attn_mask":
        c["attn_mask"] = None
    elif c["attn_mask"] is None:
        c.update(attn_mask=0.7, am_b=1, am_h=1, am_kind="contig")
    recipes = build(d, c)
    categories(c, stats)
    layout, tok = draw_layout(d, c, multiple_of_16=invalid != "block size")
    stats[f"layout {layout.block_q}x{layout.block_k}"] += 1
    stats["layout packed" if c["packed"] else "layout per batch row"] += 1
    policy = hf_ahfa.AdaptivePolicy(mode="adaptive", tau=1.0, density_limit=1.0, block_size=16, stride=8) \
        if invalid == "policy" else None
    grad = d.bool(0.25)
    stats["grad" if grad else "forward"] += 1
    runs = [("reference", torch.float64), ("triton", torch.float32), ("triton", torch.float16)]
    if not grad:
        runs.insert(1, ("reference", torch.float32))
    run_example(d, c, recipes, runs, grad=grad, layout=layout, layout_tokens=tok, policy=policy, stats=stats)


ADAPTIVE_EXACT = hf_ahfa.AdaptivePolicy(mode="adaptive", tau=1.0, density_limit=1.0, block_size=16, stride=8)


@fuzz_settings(fast=10, long=500)
@given(data=st.data())
def test_adaptive_fuzz(data):
    """``tau = density_limit = 1``: the adaptive path keeps every visible block, i.e. exact attention."""
    d = HypothesisDraw(data)
    shapes = dict(CPU_SHAPES, maxlen=max(CPU_SHAPES["maxlen"], 48), max_bh=4, max_prog=max(CPU_SHAPES["max_prog"], 14))
    c = draw_call(d, shapes, packed=d.bool(0.1), min_q=32 if d.bool(0.85) else 0)
    if d.bool(0.7):
        c["window"] = None
    if d.bool(0.8):
        c["attn_mask"] = None
    recipes = build(d, c)
    stats = STATS["adaptive"]
    categories(c, stats)
    grad = d.bool(0.2)
    stats["grad" if grad else "forward"] += 1
    runs = [("reference", torch.float64), ("triton", torch.float32), ("triton", torch.float16)]
    with hf_ahfa.record() as rec:
        run_example(d, c, recipes, runs, grad=grad, policy=ADAPTIVE_EXACT, stats=stats)
    routes = {r["route"] for r in rec}
    stats["ran adaptive" if "adaptive" in routes else "ran exact (policy declined)"] += 1


@fuzz_settings(fast=100, long=1000)
@given(data=st.data())
def test_visibility_matches_oracle(data):
    """The vectorised visibility (used for tolerances and on the GPU) equals the oracle's loop."""
    d = HypothesisDraw(data)
    c = draw_call(d, dict(CPU_SHAPES, maxlen=30), packed=False, mask=False)
    want = ORACLE["visible"](c["Q"], c["K"], c["causal"], c["window"])
    got = visibility(c, {"q": torch.zeros(0)})[0, 0]
    assert torch.equal(got, want), _describe(c)


def test_documented_errors_name_the_argument():
    """The invalid combinations the README allows: layout with attn_mask or policy, bf16 under the interpreter."""
    q, k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 20, 1, 16), torch.randn(1, 20, 1, 16)
    layout = hf_ahfa.BlockLayout.from_dense(torch.ones(1, 2, 2, 2, dtype=torch.bool), 16, 16, 20, 20)
    with pytest.raises(ValueError, match="layout.*attn_mask"):
        hf_ahfa.attention(q, k, v, layout=layout, attn_mask=torch.ones(1, 1, 20, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout.*policy"):
        hf_ahfa.attention(q, k, v, layout=layout, policy=ADAPTIVE_EXACT)
    if INTERPRETING:
        with pytest.raises(RuntimeError, match="backend 'triton'.*bfloat16"):
            hf_ahfa.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="triton")


# ---------------------------------------------------------------------------------------------- GPU


GPU_SHARDS = 16  # configuration i runs in shard i % GPU_SHARDS: with pytest-xdist the compiles spread over cores


@pytest.mark.gpu
@pytest.mark.parametrize("shard", range(GPU_SHARDS))
def test_gpu_fuzz(monkeypatch, shard):
    """The same drawing at real tile shapes (lengths up to 1100, head dims 64/80/128/256, GQA up to 7:1) in
    bfloat16 and float16 on CUDA against the float64 oracle; gradients for a subset; user layouts and
    adaptive policies (tau = density_limit = 1) among them. ``AHFA_FUZZ_GPU_CONFIGS`` (520) configurations
    over all shards; each shard prints one summary line. ``AHFA_FUZZ_GPU_ONLY=i,j``: only those indexes."""
    n = int(os.environ.get("AHFA_FUZZ_GPU_CONFIGS", 520))
    seed = int(os.environ.get("AHFA_FUZZ_SEED", 0 if not LONG else random.randrange(2**31)))
    stats = STATS[f"gpu shard {shard}"]
    runs = [("triton", torch.bfloat16), ("triton", torch.float16)]
    # the oracle's visibility is a Python loop per (query, key): at 1100 x 1100 its vectorised twin (equal to it,
    # test_visibility_matches_oracle) stands in; the oracle's arithmetic is unchanged
    monkeypatch.setitem(ORACLE["attention"].__globals__, "_visible", positional)
    mine = range(shard, n, GPU_SHARDS)
    if os.environ.get("AHFA_FUZZ_GPU_ONLY"):  # re-run given configurations (the index a failure prints),
        mine = [int(i) for i in os.environ["AHFA_FUZZ_GPU_ONLY"].split(",")][shard::GPU_SHARDS]  # spread over shards
    for i in mine:
        print(f"configuration {i}")  # shown with a failure
        d = RandomDraw(seed * 1_000_003 + i)
        what = d.choice(["dense"] * 6 + ["decode", "grad", "grad", "layout", "adaptive"])
        if what == "decode":  # few queries over a long cache: the split-KV path
            c = draw_call(d, GPU_SHAPES, packed=False)
            c["Q"], c["K"] = d.int(1, 16), d.int(512, 1100)
        elif what == "adaptive":
            c = draw_call(d, GPU_SHAPES, packed=False, min_q=256)
            c["window"] = None
            c["attn_mask"] = None
        else:
            c = draw_call(d, GPU_SHAPES)
        if what in ("layout",):
            c["attn_mask"] = None
        # one structure per dtype (the values rounded through it, so that the oracle sees exactly the inputs)
        recipes = {dt: build(d, c, round_dtype=dt) for dt in (torch.bfloat16, torch.float16)}
        layout = tok = policy = None
        if what == "layout":
            layout, tok = draw_layout(d, c, device="cuda")
        if what == "adaptive":
            policy = hf_ahfa.AdaptivePolicy(mode="adaptive", tau=1.0, density_limit=1.0,
                                            block_size=d.choice([64, 128]), stride=16)
        categories(c, stats)
        stats[what] += 1
        run_example(d, c, recipes, runs, grad=what == "grad", layout=layout, layout_tokens=tok, policy=policy,
                    device="cuda", stats=stats, round_dtypes={torch.bfloat16: torch.bfloat16,
                                                              torch.float16: torch.float16})
    line = (f"gpu fuzz seed={seed} shard {shard}/{GPU_SHARDS}: {len(mine)} of {n} configurations; "
            + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    print(line)
    # every configuration ran (or was refused with its documented error) on both dtypes
    assert sum(v for k, v in stats.items() if k.startswith(("run:", "rejected:"))) == len(runs) * len(mine)
