"""The reference backend (``hf_ahfa.attention`` on CPU) against the float64 oracle in conftest.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_ahfa
from hf_ahfa.masks import make_layout
from hf_ahfa.reference import reference_attention_backward, reference_attention_probs
from hf_ahfa.spec import make_call


@pytest.fixture(autouse=True, scope="module")
def _reference_backend():
    # on the CPU the router would send plain calls to torch's SDPA: these tests are about our reference
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AHFA_BACKEND", "reference")
        yield


def _qkv(B, Q, K, Hq, Hkv, D, dtype=torch.float32, Dv=None, seed=0, transposed=True):
    """Fresh random inputs; ``transposed`` gives (B, T, H, D) views of (B, H, T, D) memory, as Transformers does."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Q, Hq, D), (B, K, Hkv, D), (B, K, Hkv, Dv or D)]
    if transposed:
        return [torch.randn(b, h, t, d, generator=g, dtype=dtype).transpose(1, 2) for b, t, h, d in shapes]
    return [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]


def _close(out, ref, atol):
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= atol, f"max abs error {err:.3e} > {atol:.1e}"


SHAPES = [  # (Q, K): lengths that break naive tiling, decode, K > Q
    (1, 1), (1, 97), (63, 63), (97, 97), (63, 130), (97, 1025), (1025, 1025),
]


@pytest.mark.parametrize("Q,K", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_oracle_shapes(oracle, Q, K, causal):
    q, k, v = _qkv(1, Q, K, 4, 2, 64)
    out, lse = hf_ahfa.attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = oracle(q, k, v, causal=causal)
    _close(out, ref, 2e-6)
    _close(lse, ref_lse, 2e-5)
    assert out.shape == (1, Q, 4, 64) and out.is_contiguous()


@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)])
def test_head_dims_and_gqa(oracle, D, Hq, Hkv):
    q, k, v = _qkv(2, 33, 47, Hq, Hkv, D, seed=D + Hq)
    _close(hf_ahfa.attention(q, k, v, causal=True), oracle(q, k, v, causal=True)[0], 2e-6)


@pytest.mark.parametrize("window", [1, 5, 64, 500, (3, 7), (0, 0), (10, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows(oracle, window, causal):
    # 500 is larger than the sequence: must equal no window
    q, k, v = _qkv(1, 97, 130, 4, 2, 32, seed=7)
    out = hf_ahfa.attention(q, k, v, causal=causal, window=window)
    _close(out, oracle(q, k, v, causal=causal, window=window)[0], 2e-6)


def test_softcap_sinks_scale_and_v_head_dim(oracle):
    q, k, v = _qkv(2, 40, 70, 6, 3, 48, Dv=24, seed=3)
    q = q * 4  # large scores so the softcap bites
    sinks = torch.randn(6)
    kw = dict(causal=True, softcap=2.5, sinks=sinks, scale=0.3)
    _close(hf_ahfa.attention(q, k, v, **kw), oracle(q, k, v, **kw)[0], 2e-6)


def test_padding_and_fully_masked_rows(oracle):
    q, k, v = _qkv(3, 20, 20, 4, 2, 16, seed=5)
    kpm = torch.ones(3, 20, dtype=torch.bool)
    kpm[0, :7] = False  # left padding: causal rows 0..6 see nothing
    kpm[1] = False  # a fully padded sequence
    amask = torch.rand(3, 4, 20, 20, generator=torch.Generator().manual_seed(1)) > 0.3
    amask[2, 1, 5] = False  # one fully masked row in one head
    sinks = torch.randn(4)
    for kw in (dict(key_padding_mask=kpm), dict(key_padding_mask=kpm, attn_mask=amask, sinks=sinks)):
        out, lse = hf_ahfa.attention(q, k, v, causal=True, return_lse=True, **kw)
        ref, ref_lse = oracle(q, k, v, causal=True, **kw)
        assert torch.isfinite(out).all()
        _close(out, ref, 2e-6)
        assert torch.equal(lse.isinf(), ref_lse.isinf())
        assert (out[0, :7] == 0).all() and (out[1] == 0).all()


def test_cu_seqlens(oracle):
    cu = torch.tensor([0, 1, 18, 18, 50, 61])  # includes an empty sequence and a single token
    q, k, v = _qkv(1, 61, 61, 4, 2, 16, seed=9)
    for kw in (dict(causal=True), dict(causal=True, window=4), dict(causal=False, window=(2, 3))):
        _close(hf_ahfa.attention(q, k, v, cu_seqlens=cu, **kw), oracle(q, k, v, cu_seqlens=cu, **kw)[0], 2e-6)


def test_cu_seqlens_pair_k_longer(oracle):
    # chunked prefill of packed sequences: each sequence has more keys than queries (bottom-right causal)
    cu_q, cu_k = torch.tensor([0, 3, 10]), torch.tensor([0, 9, 30])
    q, k, v = _qkv(1, 10, 30, 2, 1, 16, seed=2)
    out = hf_ahfa.attention(q, k, v, causal=True, cu_seqlens=(cu_q, cu_k))
    _close(out, oracle(q, k, v, causal=True, cu_seqlens=(cu_q, cu_k))[0], 2e-6)


@pytest.mark.parametrize("kw", [
    dict(causal=True),
    dict(causal=True, window=9, softcap=3.0),
    dict(causal=False, sinks="sinks"),
    dict(causal=True, key_padding_mask="kpm"),
])
def test_gradients_float64(oracle, kw):
    q, k, v = [t.double().requires_grad_() for t in _qkv(2, 37, 53, 4, 2, 16, seed=11)]
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(2, 53, dtype=torch.bool)
    kpm[1, :30] = False  # also leaves causal rows with no visible key
    kw = {n: (sinks if a == "sinks" else kpm if a == "kpm" else a) for n, a in kw.items()}
    grad_out = torch.randn(2, 37, 4, 16, dtype=torch.float64)
    inputs = [q, k, v] + ([sinks] if "sinks" in kw else [])
    got = torch.autograd.grad(hf_ahfa.attention(q, k, v, **kw), inputs, grad_out)
    want = torch.autograd.grad(oracle(q, k, v, **kw)[0], inputs, grad_out)
    for name, a, b in zip("q k v sinks".split(), got, want):
        assert torch.isfinite(a).all(), name
        err = (a - b).abs().max().item()
        assert err < 1e-10, f"d{name}: {err:.2e}"


@pytest.mark.parametrize("kw, parts", [
    (dict(causal=True, window=(9, 0), alibi_slopes="slopes"), 1),  # K > Q: bottom-right
    (dict(softcap=3.0, attn_mask="mask"), 3),  # three key parts, as three ring steps; rows that see nothing
])
def test_backward_from_given_out_and_lse(oracle, kw, parts):
    """reference_attention_backward (flash-attention's contract: gradients from the final out and lse): over one
    call, the gradients of autograd; over key parts, each run with the whole call's out and lse, dq summed and
    dk, dv joined, the whole call's gradients (what a ring of steps needs)."""
    q, k, v = [t.double().requires_grad_() for t in _qkv(2, 37, 53, 4, 2, 16, seed=12)]
    mask = torch.rand(2, 1, 37, 53, generator=torch.Generator().manual_seed(3)) < 0.7
    mask[1, :, 5] = False
    named = dict(slopes=2.0 ** -torch.arange(1.0, 5.0, dtype=torch.float64), mask=mask)  # exact in float32
    kw = {n: named.get(a, a) if isinstance(a, str) else a for n, a in kw.items()}
    grad_out = torch.randn(2, 37, 4, 16, dtype=torch.float64)
    out, lse = oracle(q, k, v, **kw)
    want = torch.autograd.grad(out, [q, k, v], grad_out)
    dq, dks, dvs = 0, [], []
    for cols in torch.arange(53).chunk(parts):
        part = slice(int(cols[0]), int(cols[-1]) + 1)
        kp, vp = k[:, part].detach(), v[:, part].detach()
        part_kw = dict(kw, attn_mask=kw["attn_mask"][..., part]) if "attn_mask" in kw else kw
        call = make_call(q, kp, vp, **part_kw)
        got = reference_attention_backward(grad_out, q.detach(), kp, vp, out.detach(), lse.detach(),
                                           make_layout(37, kp.shape[1], q.device), call)
        dq, dks, dvs = dq + got[0], dks + [got[1]], dvs + [got[2]]
    for name, a, b in zip("qkv", (dq, torch.cat(dks, 1), torch.cat(dvs, 1)), want):
        err = (a - b).abs().max().item()
        assert err < 1e-10, f"d{name}: {err:.2e}"


def test_float16_error_within_torch_error(oracle):
    # The reference run in fp16 must not be less accurate than PyTorch's own fp16 attention.
    q, k, v = _qkv(2, 130, 130, 8, 2, 64, dtype=torch.float16, seed=4)
    out = hf_ahfa.attention(q, k, v, causal=True)
    ref = oracle(q, k, v, causal=True)[0]
    torch_fp16 = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    ours, theirs = (out.double() - ref).abs().max(), (torch_fp16.double() - ref).abs().max()
    assert out.dtype == torch.float16
    assert ours <= 2 * theirs, f"ahfa fp16 error {ours:.2e} vs torch fp16 error {theirs:.2e}"


def test_dropout_statistics_and_rng():
    q, k, _ = _qkv(1, 256, 256, 2, 2, 16, seed=6)
    v = torch.ones(1, 256, 2, 16)
    torch.manual_seed(0)
    out = hf_ahfa.attention(q, k, v, dropout_p=0.25)
    # each output is sum_j p_j * keep_j / 0.75: mean 1, and some rows must differ from 1
    assert abs(out.mean().item() - 1.0) < 0.02
    assert (out - 1).abs().max() > 0.05
    torch.manual_seed(0)
    assert torch.equal(out, hf_ahfa.attention(q, k, v, dropout_p=0.25))


def test_dropout_under_activation_checkpointing():
    q, k, v = [t.clone().requires_grad_() for t in _qkv(1, 64, 64, 2, 1, 16, seed=8)]

    def f(q, k, v):
        return hf_ahfa.attention(q, k, v, causal=True, dropout_p=0.3)

    torch.manual_seed(123)
    plain = torch.autograd.grad(f(q, k, v).square().sum(), (q, k, v))
    torch.manual_seed(123)
    ckpt = torch.utils.checkpoint.checkpoint(f, q, k, v, use_reentrant=False)
    recomputed = torch.autograd.grad(ckpt.square().sum(), (q, k, v))
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


def test_probs_path_matches_tiled(oracle):
    # output_attentions goes through the untiled path: same output, probabilities rows sum to 1 (or 0)
    q, k, v = _qkv(2, 30, 45, 4, 2, 16, seed=12)
    kpm = torch.ones(2, 45, dtype=torch.bool)
    kpm[0, :20] = False
    layout = make_layout(30, 45, q.device)
    out, probs = reference_attention_probs(q, k, v, layout, make_call(q, k, v, causal=True, scale=0.25,
                                                                      key_padding_mask=kpm))
    _close(out, oracle(q, k, v, causal=True, scale=0.25, key_padding_mask=kpm)[0], 2e-6)
    sums = probs.sum(-1)
    assert torch.allclose(sums[sums > 0], torch.ones(()), atol=1e-5)
    assert (sums[0, :, :5] == 0).all()  # rows that see only padding


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2), Q=st.integers(1, 40), extra_k=st.integers(0, 40), hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]), D=st.sampled_from([8, 24]), causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 50), st.tuples(st.integers(0, 20), st.integers(0, 20))),
    softcap=st.one_of(st.none(), st.floats(0.5, 10)), use_sinks=st.booleans(), pad=st.integers(0, 10),
    seed=st.integers(0, 2**16),
)
def test_property_matches_oracle(oracle, B, Q, extra_k, hkv, group, D, causal, window, softcap, use_sinks, pad, seed):
    K = Q + extra_k
    q, k, v = _qkv(B, Q, K, hkv * group, hkv, D, seed=seed)
    kpm = torch.ones(B, K, dtype=torch.bool)
    kpm[:, : min(pad, K)] = False
    sinks = torch.randn(hkv * group, generator=torch.Generator().manual_seed(seed)) if use_sinks else None
    kw = dict(causal=causal, window=window, softcap=softcap, sinks=sinks, key_padding_mask=kpm)
    out, lse = hf_ahfa.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = oracle(q, k, v, **kw)
    _close(out, ref, 5e-6)
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    finite = ref_lse.isfinite()
    _close(lse[finite], ref_lse[finite], 5e-5)


def test_nan_poisoned_inputs_outside_view_are_ignored(oracle):
    # Strided views into NaN-filled storage: any read outside the view poisons the result.
    base = torch.full((2, 50, 6, 40), float("nan"))
    base[:, :, :4, :16] = torch.randn(2, 50, 4, 16)
    q = base[:, :30, :4, :16]
    kbase = torch.full((2, 50, 3, 40), float("nan"))
    kbase[:, :, :2, 8:24] = torch.randn(2, 50, 2, 16)
    k = kbase[:, :, :2, 8:24]
    v = kbase[:, :, :2, 8:24].flip(1)
    out = hf_ahfa.attention(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    _close(out, oracle(q, k, v, causal=True)[0], 2e-6)


# ------------------------------------------------------------------------------ dense_attention (the "dense" route)

@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2), Q=st.integers(1, 24), extra_k=st.integers(0, 30), hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]), causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 12), st.integers(0, 12))),
    softcap=st.one_of(st.none(), st.floats(0.5, 50)), use_sinks=st.booleans(), pad=st.integers(0, 6),
    dense_mask=st.booleans(), seed=st.integers(0, 2**16),
)
def test_dense_attention_matches_oracle(oracle, B, Q, extra_k, hkv, group, causal, window, softcap, use_sinks, pad,
                                        dense_mask, seed):
    """The untiled route: outputs and gradients equal the float64 oracle on odd shapes, GQA, causality, windows,
    softcap, sinks, key padding and dense masks (rows that see no key among them: zeros, zero gradients)."""
    from hf_ahfa.reference import dense_attention

    K = Q + extra_k
    q, k, v = (t.requires_grad_() for t in _qkv(B, Q, K, hkv * group, hkv, 8, seed=seed))
    g = torch.Generator().manual_seed(seed)
    kpm = torch.arange(K)[None].expand(B, K) >= torch.tensor([[0], [pad]])[:B]
    am = torch.rand(B, 1, Q, K, generator=g) > 0.3 if dense_mask else None
    sinks = torch.randn(hkv * group, generator=g) if use_sinks else None
    kw = dict(causal=causal, window=window, softcap=softcap, sinks=sinks, key_padding_mask=kpm, attn_mask=am)
    out = dense_attention(q, k, v, make_call(q, k, v, **kw))
    ref = oracle(q, k, v, **kw)[0]
    _close(out, ref, 5e-6)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))
    for got, want in zip(*grads):
        _close(got, want, 2e-5)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("case", ["decode", "causal", "padding"])
def test_dense_attention_keeps_a_hidden_nan_out(case):
    """A NaN key or value that a query cannot see stays out of its output, as in the tiled reference (the untiled
    path checks for non-finite values and takes the guarded computation where it finds one)."""
    from hf_ahfa.reference import dense_attention

    Q, K = (1, 50) if case == "decode" else (20, 20)
    q, k, v = _qkv(1, Q, K, 4, 2, 8, seed=3)
    kw = dict(causal=True, softcap=20.0)
    if case == "padding":
        kw["key_padding_mask"] = torch.arange(K)[None] >= 5
    poisoned = 2 if case == "padding" else K - 1  # padding: a padded key; causal: the last key; decode: seen by all
    for t in (k, v):
        bad = [x.clone() for x in (q, k, v)]
        bad[1 if t is k else 2][0, poisoned, 0, 0] = float("nan")
        out = dense_attention(*bad, make_call(*bad, **kw))
        # the rows that see it, in the query heads of key/value head 0 (GQA 4/2)
        sees = torch.zeros(Q, 4, dtype=torch.bool)
        sees[slice(0, Q) if case == "decode" else slice(Q - 1, Q) if case == "causal" else slice(0, 0), :2] = True
        assert not torch.isfinite(out[0][sees]).all(-1).any()
        clean = dense_attention(q, k, v, make_call(q, k, v, **kw))  # (unguarded: its rounding differs by ~1 ulp)
        _close(out[0][~sees], clean[0][~sees].double(), 1e-6)


def test_a_softcapped_decode_step_runs_dense_where_timed_faster(monkeypatch):
    """On the CPU a call SDPA cannot compute (here softcap) times the untiled route against the tiled reference once
    per shape and keeps the faster (a decode step over 700 keys, where the tiles cost a dozen operations each: dense
    on an idle machine; the test asserts the rule, not the machine's load), equal to the reference either way; a
    prompt past DENSE_MAX_SCORES is never offered it."""
    from hf_ahfa import fastest, router

    monkeypatch.delenv("AHFA_BACKEND")
    monkeypatch.setattr(fastest, "_times", {})
    monkeypatch.setattr(fastest, "_decided", {})
    q, k, v = _qkv(1, 1, 700, 4, 2, 16, seed=5)
    want = hf_ahfa.attention(q, k, v, causal=True, softcap=30.0, backend="reference").double()
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, causal=True, softcap=30.0)
    (times,) = fastest._times.values()
    assert sorted(times) == ["dense", "reference"]
    faster = times["dense"] < (1 - router.SDPA_MARGIN) * times["reference"]  # (the incumbent: the tiles)
    assert rec[-1]["route"] == ("dense" if faster else "reference") and rec[-1]["backend"] == "reference"
    _close(out, want, 1e-6)
    monkeypatch.setattr(fastest, "_decided", {key: "dense" for key in fastest._times})
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, causal=True, softcap=30.0)
    assert rec[-1]["route"] == "dense"
    _close(out, want, 1e-6)
    monkeypatch.setattr(router, "DENSE_MAX_SCORES", 4 * 700 - 1)
    monkeypatch.setattr(fastest, "_decided", {})
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, causal=True, softcap=30.0)
    assert rec[-1]["route"] == "reference"


def test_timing_a_call_leaves_the_sinks_gradient_alone(monkeypatch):
    """A call with sinks that is timed (here the untiled route against the tiled one, with gradients) runs each
    candidate's backward on copies: the sinks parameter's .grad after one backward is that call's alone (the
    timing's backwards once added to it: gpt-oss's sinks gradient off by 200 against eager)."""
    from hf_ahfa import fastest

    monkeypatch.delenv("AHFA_BACKEND")
    monkeypatch.setattr(fastest, "_times", {})
    monkeypatch.setattr(fastest, "_decided", {})
    q, k, v = (t.requires_grad_() for t in _qkv(1, 3, 700, 4, 2, 16, seed=8))
    sinks = torch.nn.Parameter(torch.randn(4))
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, causal=True, sinks=sinks).sum().backward()
    assert fastest.measured(), "the call was not timed"
    got = sinks.grad.clone()
    sinks.grad = None
    hf_ahfa.attention(q, k, v, causal=True, sinks=sinks, backend="reference").sum().backward()
    _close(got, sinks.grad.double(), 1e-5)
    assert rec[-1]["route"] in ("dense", "reference")


def test_dense_attention_traces_whole():
    """Under torch.compile(fullgraph=True) the untiled route asks the host nothing (a masked call takes the guarded
    computation): the compiled call equals the eager one."""
    from hf_ahfa.reference import dense_attention

    q, k, v = _qkv(1, 12, 12, 4, 2, 8, seed=9)
    call = make_call(q, k, v, causal=True, softcap=5.0, key_padding_mask=torch.arange(12)[None] >= 2)
    got = torch.compile(lambda a, b, c: dense_attention(a, b, c, call), fullgraph=True, backend="eager")(q, k, v)
    _close(got, dense_attention(q, k, v, call).double(), 1e-6)
