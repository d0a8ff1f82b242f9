"""Installed flash-attn kernels as router candidates (hf_ahfa.installed).

flash-attn cannot be installed on the CPU machines (nor, without a CUDA toolkit, on the GPU machine), so these tests
stand in a module with flash-attn 2's functions, written here from flash-attn's documented semantics and
independently of hf_ahfa (bottom-right aligned causality and windows, ALiBi ``-slope * |i + Sk - Sq - j|``,
softcap, empty rows giving zeros), and check that what the router hands it computes our calls exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

import hf_ahfa
from hf_ahfa import fastest, installed, router


class FakeFlashAttn2:
    """flash_attn's public functions, as its documentation defines them (float64 inside)."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        self.calls.append(dict(causal=causal, window_size=window_size, softcap=softcap))
        assert dropout_p == 0.0 and not return_attn_probs and q.dtype in (torch.float16, torch.bfloat16)
        B, Sq, H, D = q.shape
        Sk, Hk = k.shape[1], k.shape[2]
        kk, vv = (t.double().repeat_interleave(H // Hk, 2) for t in (k, v))
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * (softmax_scale or 1 / math.sqrt(D))
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(Sq)[:, None] + Sk - Sq
        j = torch.arange(Sk)[None, :]
        if alibi_slopes is not None:
            slopes = alibi_slopes.double().reshape(-1 if alibi_slopes.dim() == 2 else 1, H)
            s = s - slopes[:, :, None, None] * (i - j).abs()
        ok = torch.ones(Sq, Sk, dtype=torch.bool)
        if causal:
            ok &= j <= i
        if window_size[0] >= 0:
            ok &= j >= i - window_size[0]
        if window_size[1] >= 0:
            ok &= j <= i + window_size[1]
        p = torch.softmax(s.masked_fill(~ok, -math.inf), -1).nan_to_num(0.0)  # a row that sees nothing: zeros
        return torch.einsum("bhqk,bkhd->bqhd", p, vv).to(q.dtype)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
        assert cu_seqlens_q.dtype == torch.int32 and q.dim() == 3
        outs = []
        for s in range(len(cu_seqlens_q) - 1):
            a, b, c, d = (int(x) for x in (cu_seqlens_q[s], cu_seqlens_q[s + 1], cu_seqlens_k[s], cu_seqlens_k[s + 1]))
            slopes = kw.get("alibi_slopes")
            one = {**kw, "alibi_slopes": slopes[s] if slopes is not None and slopes.dim() == 2 else slopes}
            outs.append(self.flash_attn_func(q[None, a:b], k[None, c:d], v[None, c:d], **one)[0])
        return torch.cat(outs)


@pytest.fixture
def fake_fa2(monkeypatch):
    """flash-attn 2 'installed' and runnable on the CPU; the router's timing says it is the fastest."""
    module = FakeFlashAttn2()
    monkeypatch.setattr(installed, "modules", lambda: {"flash-attn-2": module})
    monkeypatch.setattr(installed, "runs_on", lambda name, device: True)
    monkeypatch.setattr(fastest, "_times", {})
    monkeypatch.setattr(fastest, "_decided", {})
    monkeypatch.setattr(fastest, "_median_ms",
                        lambda cands, device: {n: 0.5 if n.startswith("flash-attn") else 1.0 for n in cands})
    return module


def _qkv(B, Q, K, seed, H=4, HKV=2, D=16, DV=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, d, generator=g).half().requires_grad_()
               for T, h, d in ((Q, H, D), (K, HKV, D), (K, HKV, DV)))
    return q, k, v


CASES = {
    "softcap": dict(causal=True, softcap=5.0),
    "alibi": dict(causal=True, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    "window": dict(causal=True, window=6),
    "bidirectional window": dict(window=(3, 5)),
    "chunk over a cache": dict(causal=True, K=29),  # bottom-right (SDPA would take it as a mask: kept out below)
    "queries beyond the keys": dict(window=(1, 1), Q=20, K=6),  # rows that see no key
    "packed": dict(causal=True, cu_seqlens=torch.tensor([0, 5, 17, 20])),
    "packed alibi": dict(causal=True, cu_seqlens=torch.tensor([0, 9, 20]),
                         alibi_slopes=torch.tensor([[0.5, 0.25, 0.1, 0.05], [0.3, 0.2, 0.1, 0.0]])),
}


@pytest.mark.parametrize("case", CASES)
def test_calls_routed_to_flash_attn_compute_our_semantics(fake_fa2, oracle, case, monkeypatch):
    """Where an installed flash-attn was timed fastest the call runs there: its output and gradients equal the
    float64 oracle of our call (the arguments it was handed mean what ours do)."""
    kw = dict(CASES[case])
    if case == "chunk over a cache":  # the CPU sends what SDPA computes to SDPA untimed: its mask made too large
        monkeypatch.setattr(router, "SDPA_MASK_MAX", 0)
    Q, K = kw.pop("Q", 20), kw.pop("K", 20)
    B = 1 if "cu_seqlens" in kw else 2
    q, k, v = _qkv(B, Q, K, seed=len(case))
    oracle_kw = {n: a for n, a in kw.items() if n != "cu_seqlens"}
    if "cu_seqlens" in kw:
        oracle_kw["cu_seqlens"] = kw["cu_seqlens"]
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, **kw)
    assert (rec[0]["route"], rec[0]["backend"]) == ("flash-attn-2", "flash-attn") and fake_fa2.calls
    want = oracle(q, k, v, **oracle_kw)[0]
    gout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), gout.half())
    want_grads = torch.autograd.grad(want, (q, k, v), gout)
    for name, got, w in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        err = (got.double() - w.double()).abs().max().item()
        assert err < 5e-3 * max(1.0, w.abs().max().item()), f"{name}: {err:.3g}"


@pytest.mark.parametrize("kw,why", [
    (dict(sinks=torch.zeros(4)), "sinks"), (dict(dropout_p=0.3), "dropout"),
    (dict(key_padding_mask=torch.ones(2, 20, dtype=torch.bool)), "mask"), (dict(return_lse=True), "log-sum-exp"),
    (dict(dtype=torch.float32), "dtype"), (dict(DV=32), "value head dim"),
])
def test_calls_flash_attn_does_not_compute_never_reach_it(fake_fa2, kw, why):
    kw = dict(kw)
    q, k, v = _qkv(2, 20, 20, seed=3, DV=kw.pop("DV", 16))
    if "dtype" in kw:
        dtype = kw.pop("dtype")
        q, k, v = (t.detach().to(dtype) for t in (q, k, v))
    call_kw = {n: a for n, a in kw.items() if n != "return_lse"}
    from hf_ahfa.spec import make_call

    call = make_call(q, k, v, causal=True, softcap=5.0, **call_kw)
    assert why in installed.unfit_reason("flash-attn-2", q, k, v, call, need_lse="return_lse" in kw)
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, causal=True, softcap=5.0, **kw)
    assert rec[0]["route"] == "reference" and not fake_fa2.calls


def test_flash_attn_3_takes_neither_alibi_nor_packed_sequences():
    from hf_ahfa.spec import make_call

    q, k, v = _qkv(1, 20, 20, seed=4)
    alibi = make_call(q, k, v, causal=True, alibi_slopes=torch.ones(4))
    packed = make_call(q, k, v, causal=True, cu_seqlens=torch.tensor([0, 8, 20]))
    for call in (alibi, packed):
        assert "flash-attn 3" in installed.unfit_reason("flash-attn-3", q, k, v, call, need_lse=False)
        assert "GPU" in installed.unfit_reason("flash-attn-2", q, k, v, call, need_lse=False)  # this CPU


def test_forced_backends_and_slower_flash_attn_keep_their_route(fake_fa2, monkeypatch):
    """AHFA_BACKEND / backend= run our own code only; a flash-attn not timed SDPA_MARGIN faster than the
    incumbent (ours where SDPA does not fit) leaves the call where it was."""
    q, k, v = _qkv(2, 20, 20, seed=5)
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, causal=True, softcap=5.0, backend="reference")
        monkeypatch.setattr(fastest, "_median_ms", lambda cands, device: {
            n: 0.97 if n.startswith("flash-attn") else 1.0 for n in cands})
        monkeypatch.setattr(fastest, "_decided", {})
        monkeypatch.setattr(fastest, "_times", {})
        hf_ahfa.attention(q, k, v, causal=True, softcap=5.0)
    assert [r["route"] for r in rec] == ["reference", "reference"] and not fake_fa2.calls


def test_nothing_installed_means_no_candidates(monkeypatch):
    """Without an importable flash-attn (this machine, CI) there are no candidates and routing is as before."""
    import importlib

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    installed.modules.cache_clear()
    try:
        assert installed.modules() == {}
        q, k, v = _qkv(1, 20, 20, seed=6)
        from hf_ahfa.spec import make_call

        assert installed.candidates(q, k, v, make_call(q, k, v, causal=True, softcap=5.0), need_lse=False) == []
        with hf_ahfa.record() as rec:
            hf_ahfa.attention(q, k, v, causal=True, softcap=5.0)
        assert rec[0]["route"] in ("reference", "dense")  # our own PyTorch code, tiled or not (timed on the CPU)
    finally:
        installed.modules.cache_clear()
