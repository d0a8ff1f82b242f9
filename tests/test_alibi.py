"""ALiBi (``alibi_slopes``, issue 14 item 1) against the float64 oracle: forward and gradients of the reference and
the Triton kernels (interpreter on the CPU), bottom-right alignment, GQA, windows, softcap, per-batch slopes,
packed sequences, the split-KV decode kernel, block-sparse layouts, routing and bad input."""

from __future__ import annotations

import pytest
import torch

import hf_ahfa
from hf_ahfa import patterns

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(B, Q, K, Hq, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g).to(DEVICE).requires_grad_()
            for T, H in ((Q, Hq), (K, Hkv), (K, Hkv))]


def _slopes(Hq, batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (Hq,) if batch is None else (batch, Hq)
    return (torch.rand(shape, generator=g) * 0.5 + 0.05).to(DEVICE)


def _check(got, want, leaves, tol=2e-5):
    torch.testing.assert_close(got.double(), want.detach(), atol=tol, rtol=tol)
    gout = torch.randn(got.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    grads = torch.autograd.grad(got, leaves, gout)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    return grads, ref_leaves, gout


def _use_form(monkeypatch, form):
    """The kernels' form of the causal ALiBi bias (``AHFA_ALIBI``): per score, the key's term alone, or the key's
    term in the forward and per score in the backward (the default)."""
    from hf_ahfa.kernels import common

    monkeypatch.setattr(common, "ALIBI_FORM", form)


FORMS = ["distance", "keys", "fwd-keys"]


@pytest.mark.parametrize("backend,form", [("reference", "distance"), ("triton", "distance"), ("triton", "keys"),
                                          ("triton", "fwd-keys")])
@pytest.mark.parametrize("kw", [
    dict(causal=True), dict(causal=True, Q=24), dict(causal=False), dict(causal=True, window=9),
    dict(causal=False, softcap=5.0), dict(causal=True, batch_slopes=True), dict(causal=True, sinks=True),
    dict(causal=True, Q=70, K=49),  # query rows that see no key
    # bidirectional: key tiles below, across and above the diagonal, ragged and padded
    dict(causal=False, Q=24, K=70), dict(causal=False, Q=70, K=49), dict(causal=False, window=(9, 20), K=70),
    dict(causal=False, sinks=True, K=70), dict(causal=False, key_padding=True, K=70),
])
def test_alibi_matches_the_oracle(backend, form, kw, oracle, monkeypatch):
    _use_form(monkeypatch, form)
    kw = dict(kw)
    Q, K, batch_slopes = kw.pop("Q", 40), kw.pop("K", 40), kw.pop("batch_slopes", False)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q, k, v = _qkv(B, Q, K, Hq, Hkv, D, seed=Q)
    slopes = _slopes(Hq, B if batch_slopes else None)
    if kw.pop("key_padding", False):  # left padding of 5 and 37 keys (whole tiles skipped, one partly)
        kw["key_padding_mask"] = (torch.arange(K)[None, :] >= torch.tensor([[5], [37]])).to(DEVICE)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(Hq, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out, lse = hf_ahfa.attention(q, k, v, alibi_slopes=slopes, backend=backend, return_lse=True, **kw)
    want, want_lse = oracle(*(t.detach().double() for t in (q, k, v)), alibi_slopes=slopes, **kw)
    # the lse too (causal ALiBi's kernels carry a per-row shift that must come out of it)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
    grads, leaves, gout = _check(out, want, (q, k, v))
    want_grads = torch.autograd.grad(oracle(*leaves, alibi_slopes=slopes, **kw)[0], leaves, gout.double())
    for got, w in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), w, atol=5e-5, rtol=5e-5)
    # the bias is really there: without it the result differs
    assert (hf_ahfa.attention(q, k, v, backend=backend, **kw) - out).abs().max() > 1e-3


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("causal", [True, False])
def test_alibi_far_from_the_diagonal_with_small_slopes(causal, form, oracle, monkeypatch):
    _use_form(monkeypatch, form)
    # slopes as small as a many-headed model's last heads: key tiles hundreds of positions away still carry mass,
    # so the bias must stay exact where its row and column terms are large
    q, k, v = _qkv(1, 300, 333, 2, 1, 16, seed=7)
    slopes = torch.tensor([2.0**-8, 2.0**-5], device=DEVICE)
    out = hf_ahfa.attention(q, k, v, alibi_slopes=slopes, causal=causal, backend="triton")
    want, _ = oracle(*(t.detach().double() for t in (q, k, v)), alibi_slopes=slopes, causal=causal)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("form", FORMS)
def test_alibi_packed_sequences_take_slopes_per_sequence(form, oracle, monkeypatch):
    _use_form(monkeypatch, form)
    q, k, v = _qkv(1, 30, 30, 4, 2, 16, seed=2)
    cu = torch.tensor([0, 11, 30], device=DEVICE)
    slopes = _slopes(4, batch=2)
    for backend in ("reference", "triton"):
        out = hf_ahfa.attention(q, k, v, causal=True, cu_seqlens=cu, alibi_slopes=slopes, backend=backend)
        want, _ = oracle(*(t.detach().double() for t in (q, k, v)), causal=True, cu_seqlens=cu.cpu(),
                         alibi_slopes=slopes)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("form", FORMS)
def test_alibi_on_the_split_kv_decode_kernel(form, oracle, monkeypatch):
    _use_form(monkeypatch, form)  # the decode kernel follows the forward's form
    q, k, v = _qkv(2, 3, 600, 4, 2, 16, seed=3)  # few queries over at least DECODE_MIN_K keys
    slopes = _slopes(4, batch=2)
    with torch.no_grad(), hf_ahfa.record() as rec:
        out, lse = hf_ahfa.attention(q, k, v, causal=True, alibi_slopes=slopes, backend="triton", return_lse=True)
    assert rec[0]["route"] == "decode"
    want, want_lse = oracle(*(t.detach().double() for t in (q, k, v)), causal=True, alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)  # the key-term form's row term is out


@pytest.mark.parametrize("K", [600, 40])  # the split-KV decode kernel, the forward kernel
@pytest.mark.parametrize("form", FORMS)
def test_alibi_one_query_not_causal(K, form, oracle, monkeypatch):
    """A decode step as Transformers passes it (one query, not causal): every key lies before the query, so the
    key-term form applies there too (``common.alibi_keys``); out and lse against the oracle."""
    _use_form(monkeypatch, form)
    q, k, v = _qkv(2, 1, K, 4, 2, 16, seed=4)
    slopes = _slopes(4, batch=2)
    with torch.no_grad(), hf_ahfa.record() as rec:
        out, lse = hf_ahfa.attention(q, k, v, causal=False, alibi_slopes=slopes, backend="triton", return_lse=True)
    assert rec[0]["route"] == ("decode" if K >= 512 else "flash")
    want, want_lse = oracle(*(t.detach().double() for t in (q, k, v)), causal=False, alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("form", FORMS)
def test_alibi_under_a_block_sparse_layout(form, oracle, monkeypatch):
    _use_form(monkeypatch, form)
    q, k, v = _qkv(1, 64, 64, 4, 2, 16, seed=4)
    layout = patterns.union(patterns.local(64, 64, block=16, width=1, heads=4, device=DEVICE),
                            patterns.global_blocks(64, 64, block=16, n=1, heads=4, device=DEVICE))
    slopes = _slopes(4)
    for backend in ("reference", "triton"):
        out = hf_ahfa.attention(q, k, v, causal=True, layout=layout, alibi_slopes=slopes, backend=backend)
        want, _ = oracle(*(t.detach().double() for t in (q, k, v)), causal=True, alibi_slopes=slopes,
                         attn_mask=layout.to_token_mask())
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_alibi_routes_to_our_kernels_and_an_adaptive_policy_runs_exact():
    q, k, v = _qkv(1, 64, 64, 4, 2, 16, seed=5)
    slopes = _slopes(4)
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, causal=True, alibi_slopes=slopes)
        hf_ahfa.attention(q, k, v, causal=True, alibi_slopes=slopes,
                          policy=hf_ahfa.AdaptivePolicy(mode="adaptive", block_size=16, stride=8))
    assert rec[0]["route"] != "sdpa" and "ALiBi" in rec[1]["reason"]
    with pytest.raises(ValueError, match="SDPA does not compute this call exactly: ALiBi slopes"):
        hf_ahfa.attention(q, k, v, alibi_slopes=slopes, backend="sdpa")


@pytest.mark.parametrize("slopes,match", [
    (torch.ones(3), r"alibi_slopes must be a floating tensor of shape \(num_q_heads,\) = \(4,\)"),
    (torch.ones(2, 4), r"\(batch, num_q_heads\) = \(1, 4\)"),
    (torch.ones(4, dtype=torch.long), "alibi_slopes must be a floating tensor"),
])
def test_bad_alibi_slopes_name_the_argument(slopes, match):
    q, k, v = _qkv(1, 8, 8, 4, 2, 16, seed=6)
    with pytest.raises(ValueError, match=match):
        hf_ahfa.attention(q, k, v, alibi_slopes=slopes.to(DEVICE))
