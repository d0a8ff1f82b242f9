"""Triton flash kernels against the PyTorch reference: outputs, lse and gradients.

On the CPU these run under TRITON_INTERPRET=1 (set in conftest.py) on small shapes; on a GPU the same
tests run on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_ahfa
from hf_ahfa.block_layout import band_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel never writes fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **kw):
        t = empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*a, **kw):
        t = empty_like(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def _qkv(B, Q, K, Hq, Hkv, D, dtype=torch.float32, seed=0, Dv=None):
    g = torch.Generator().manual_seed(seed)
    # (B, T, H, D) views of (B, H, T, D) memory, as Transformers hands them over
    make = lambda t, h, d: torch.randn(B, h, t, d, generator=g).to(DEVICE, dtype).transpose(1, 2)  # noqa: E731
    return make(Q, Hq, D), make(K, Hkv, D), make(K, Hkv, Dv or D)


def _both(q, k, v, grad=True, **kw):
    """(out, lse, grads) of the kernels and of the reference on the same inputs."""
    res = []
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
        sinks = kw.get("sinks")
        extra = {}
        if sinks is not None:
            extra["sinks"] = sinks.detach().clone().requires_grad_(grad)
            leaves.append(extra["sinks"])
        out, lse = hf_ahfa.attention(*leaves[:3], return_lse=True, backend=backend, **{**kw, **extra})
        grads = None
        if grad:
            gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(out)
            grads = torch.autograd.grad(out, leaves, gout)
        res.append((out, lse, grads))
    return res


def _check(res, atol=2e-5):
    (out, lse, grads), (r_out, r_lse, r_grads) = res
    assert not out.isnan().any(), "unwritten (NaN) output elements"
    assert torch.equal(lse.isneginf(), r_lse.isneginf())
    err = (out.float() - r_out.float()).abs().max().item()
    assert err < atol, f"out error {err:.2e}"
    fin = r_lse.isfinite()
    assert (lse[fin] - r_lse[fin]).abs().max().item() < atol
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads or (), r_grads or ()):
        assert not a.isnan().any(), f"NaN in {name}"
        err = (a.float() - b.float()).abs().max().item()
        scale = max(1.0, b.abs().max().item())
        assert err < atol * 5 * scale, f"{name} error {err:.2e}"


@pytest.mark.parametrize("Q,K", [(1, 1), (1, 37), (17, 17), (33, 50), (63, 63), (40, 97)])
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(poison, Q, K, causal):
    _check(_both(*_qkv(2, Q, K, 4, 2, 32, seed=Q * K), causal=causal))


@pytest.mark.parametrize("D", [16, 40, 80])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 1), (8, 2)])
def test_head_dims_and_gqa(poison, D, Hq, Hkv):
    _check(_both(*_qkv(1, 29, 29, Hq, Hkv, D, seed=D), causal=True))


def test_value_head_dim_differs(poison):
    _check(_both(*_qkv(1, 21, 30, 2, 1, 32, Dv=16, seed=4), causal=True))


@pytest.mark.parametrize("window,causal", [(1, True), (6, True), (100, True), ((3, 9), False), ((0, 0), False), (5, False)])
def test_windows(poison, window, causal):
    _check(_both(*_qkv(1, 50, 61, 2, 1, 16, seed=5), causal=causal, window=window))


def test_softcap_and_sinks(poison):
    q, k, v = _qkv(2, 30, 30, 4, 2, 16, seed=6)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _check(_both(q * 3, k, v, causal=True, softcap=2.0, sinks=sinks))


def test_key_padding_and_fully_masked_rows(poison):
    q, k, v = _qkv(3, 24, 24, 2, 2, 16, seed=7)
    kpm = torch.ones(3, 24, dtype=torch.bool, device=DEVICE)
    kpm[0, :9] = False  # left padding: causal rows 0..8 see nothing
    kpm[1] = False  # a whole padded sequence
    res = _both(q, k, v, causal=True, key_padding_mask=kpm)
    _check(res)
    out = res[0][0]
    assert (out[0, :9] == 0).all() and (out[1] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_skips_blocks_outside_the_visible_span(poison, causal):
    # right padding, left padding, a gap inside the span, nothing visible; the keys of whole blocks outside each
    # row's span hold NaN: a kernel that skips those blocks never reads them (a masked tile would still turn
    # 0 * NaN into NaN in P @ V), so the result is finite and equals the reference on clean inputs. The spans
    # without a gap are one run: the blocks wholly inside them run without the mask (taking the gapped row for a
    # run computes its gap's keys and fails)
    q, k, v = _qkv(4, 70, 400, 2, 1, 16, seed=11)
    kpm = torch.zeros(4, 400, dtype=torch.bool, device=DEVICE)
    kpm[0, :100] = True
    kpm[1, 300:] = True
    kpm[2, 140:260] = kpm[2, 290:330] = True
    from hf_ahfa.kernels.common import visible_span

    assert visible_span(kpm).tolist() == [[0, 100, 100], [300, 400, 100], [140, 330, 160], [400, 0, 0]]
    want = _both(q, k, v, causal=causal, key_padding_mask=kpm)[1]
    k, v = k.detach().clone(), v.detach().clone()
    for row, keys in ((0, slice(256, None)), (1, slice(0, 128)), (2, slice(0, 128)), (3, slice(None))):
        k[row, keys], v[row, keys] = float("nan"), float("nan")
    got = _both(q, k, v, causal=causal, key_padding_mask=kpm)[0]
    _check((got, want))


def test_dense_bool_mask_broadcast_heads(poison):
    q, k, v = _qkv(2, 20, 33, 4, 2, 16, seed=8)
    am = torch.rand(2, 1, 20, 33, generator=torch.Generator().manual_seed(2)).to(DEVICE) > 0.4
    am[1, 0, 3] = False
    _check(_both(q, k, v, attn_mask=am))


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 4)])
def test_packed_sequences(poison, causal, window):
    cu = torch.tensor([0, 5, 5, 22, 23, 40], device=DEVICE)  # an empty and a one-token sequence
    q, k, v = _qkv(1, 40, 40, 4, 2, 16, seed=9)
    _check(_both(q, k, v, causal=causal, window=window, cu_seqlens=cu))


def test_packed_sequences_more_keys_than_queries(poison):
    cu_q, cu_k = torch.tensor([0, 3, 10], device=DEVICE), torch.tensor([0, 19, 40], device=DEVICE)
    _check(_both(*_qkv(1, 10, 40, 2, 1, 16, seed=10), causal=True, cu_seqlens=(cu_q, cu_k)))


def test_float16_error_within_torch_error(oracle):
    q, k, v = _qkv(1, 48, 48, 4, 2, 32, dtype=torch.float16, seed=11)
    out = hf_ahfa.attention(q, k, v, causal=True, backend="triton")
    ref = oracle(q.cpu(), k.cpu(), v.cpu(), causal=True)[0]
    torch_fp16 = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    ours = (out.cpu().double() - ref).abs().max()
    theirs = (torch_fp16.cpu().double() - ref).abs().max()
    assert ours <= 2 * theirs, f"kernel fp16 error {ours:.2e} vs torch fp16 error {theirs:.2e}"


def test_dropout_statistics_and_seed():
    q, k, _ = _qkv(1, 64, 64, 2, 2, 16, seed=12)
    v = torch.ones(1, 64, 2, 16, device=DEVICE)
    torch.manual_seed(0)
    out = hf_ahfa.attention(q, k, v, dropout_p=0.25, backend="triton")
    assert abs(out.mean().item() - 1.0) < 0.05 and (out - 1).abs().max() > 0.05
    torch.manual_seed(0)
    assert torch.equal(out, hf_ahfa.attention(q, k, v, dropout_p=0.25, backend="triton"))


def test_dropout_gradients_match_explicit_mask():
    # With v = identity the output is the dropped-out probability matrix itself, which reveals the
    # kernel's keep-mask; the same seed then gives gradients an explicit-mask PyTorch model must match.
    Q = K = 32
    q, k, _ = _qkv(1, Q, K, 1, 1, 16, seed=13)
    eye = torch.eye(K, device=DEVICE).view(1, K, 1, K)
    torch.manual_seed(5)
    dropped = hf_ahfa.attention(q, k, eye, causal=True, dropout_p=0.3, backend="triton")[0, :, 0]  # (Q, K)
    keep = dropped != 0
    v = torch.randn(1, K, 1, 16, device=DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    out = hf_ahfa.attention(*leaves, causal=True, dropout_p=0.3, backend="triton")
    got = torch.autograd.grad(out.square().sum(), leaves)
    leaves2 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    s = (leaves2[0][0, :, 0] @ leaves2[1][0, :, 0].T) * 16**-0.5
    s = s.masked_fill(~torch.ones(Q, K, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    p = torch.softmax(s, -1) * keep / 0.7
    want = torch.autograd.grad((p @ leaves2[2][0, :, 0]).square().sum(), leaves2)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-4


def test_dropout_under_activation_checkpointing():
    q, k, v = [t.detach().requires_grad_() for t in _qkv(1, 32, 32, 2, 1, 16, seed=14)]

    def f(q, k, v):
        return hf_ahfa.attention(q, k, v, causal=True, dropout_p=0.2, backend="triton")

    torch.manual_seed(3)
    plain = torch.autograd.grad(f(q, k, v).sum(), (q, k, v))
    torch.manual_seed(3)
    ckpt = torch.utils.checkpoint.checkpoint(f, q, k, v, use_reentrant=False)
    for a, b in zip(plain, torch.autograd.grad(ckpt.sum(), (q, k, v))):
        assert torch.equal(a, b)


def test_opcheck():
    from hf_ahfa.kernels.flash import flash_fwd

    q, k, v = _qkv(1, 17, 17, 2, 1, 16, seed=15)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    args = (q, k, v, None, None, None, None, None, 17, 17, True, -1, -1, 0.0, 0.0, 0, 0.25)
    torch.library.opcheck(flash_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("Q,K,Hq,Hkv,kw", [
    (1, 600, 8, 2, dict(causal=True)),
    (1, 512, 4, 1, dict()),  # every tile whole: no masked tile at all
    (5, 700, 4, 2, dict(causal=True)),  # unmasked tiles up to the first query's last key, then the diagonal
    (3, 700, 4, 4, dict(causal=True, window=50)),
    (2, 530, 4, 1, dict(softcap=2.0, sinks="sinks")),
    (1, 520, 2, 1, dict(causal=True, key_padding_mask="all padded in batch 1")),
    (1, 600, 4, 2, dict(key_padding_mask="spans")),
    (2, 530, 2, 1, dict(causal=True, key_padding_mask="spans")),
    (2, 540, 4, 2, dict(causal=True, attn_mask="per head and query")),
])
def test_split_kv_decode(poison, Q, K, Hq, Hkv, kw):
    q, k, v = _qkv(2, Q, K, Hq, Hkv, 16, seed=K)
    if "attn_mask" in kw:
        # the split-KV rows are (q head, query) pairs: the dense mask must be read per head and per query
        kw["attn_mask"] = torch.rand(2, Hq, Q, K, generator=torch.Generator().manual_seed(4)).to(DEVICE) > 0.3
    if "sinks" in kw:
        kw["sinks"] = torch.randn(Hq, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    if kw.get("key_padding_mask") == "spans":
        # the kernel reads only each row's visible span: a gap inside it, left padding, and a static cache's
        # filled head (most splits then see nothing and must drop out of the merge)
        kpm = torch.zeros(2, K, dtype=torch.bool, device=DEVICE)
        kpm[0, 130:250] = kpm[0, 300:420] = True
        kpm[1, :37] = True
        kw["key_padding_mask"] = kpm
    elif "key_padding_mask" in kw:
        kpm = torch.ones(2, K, dtype=torch.bool, device=DEVICE)
        kpm[0, :200] = False
        kpm[1] = False
        kw["key_padding_mask"] = kpm
    # no gradient: inference takes the split-KV path (Q <= 16, K >= 512)
    _check(_both(q, k, v, grad=False, **kw))


def test_decode_launch_config_chosen_per_cache_length(monkeypatch):
    # a configuration timed on a short, host-bound cache must not be reused for a long one
    from hf_ahfa.kernels import tuning

    monkeypatch.setattr(tuning, "_chosen", {})
    for K in (1100, 2100, 2200):
        hf_ahfa.attention(*_qkv(1, 1, K, 4, 2, 16, seed=K), causal=True, backend="triton")
    assert len([key for key in tuning.chosen() if key.startswith("decode/")]) == 2


@settings(max_examples=12, deadline=None)
@given(
    Q=st.integers(1, 70), extra_k=st.integers(0, 50), causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 60), st.tuples(st.integers(0, 40), st.integers(0, 40))),
    seed=st.integers(0, 2**16),
)
def test_property_tile_ranges(Q, extra_k, causal, window, seed):
    # random lengths and windows move the masked/unmasked tile boundaries of all three kernels
    _check(_both(*_qkv(1, Q, Q + extra_k, 2, 1, 16, seed=seed), causal=causal, window=window))


# ---- block-sparse path: the same kernels visiting only a layout's blocks, against the reference with
# the layout expanded to a token mask (``attention(..., layout=...)`` on the reference backend)


def _layout(B, H, Q, K, bq, bk, density, seed, full_share=None):
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-Q // bq), -(-K // bk)
    blocks = torch.rand(B, H, nq, nk, generator=g) < density
    full = None if full_share is None else blocks & (torch.rand(B, H, nq, nk, generator=g) < full_share)
    return hf_ahfa.BlockLayout.from_dense(blocks.to(DEVICE), bq, bk, Q, K, full=None if full is None else full.to(DEVICE))


@pytest.mark.parametrize("Q,K,bq,bk,kw", [
    (80, 80, 32, 32, dict(causal=True)),
    (80, 80, 32, 16, dict(causal=False)),
    (45, 100, 16, 32, dict(causal=True)),  # more keys than queries, ragged blocks
    (64, 64, 32, 32, dict(causal=True, window=20)),
    (64, 64, 16, 32, dict(causal=False, window=(10, 30))),
    (48, 48, 16, 16, dict(causal=True, softcap=2.0, sinks="sinks")),
])
def test_block_sparse_matches_masked_reference(poison, Q, K, bq, bk, kw):
    q, k, v = _qkv(2, Q, K, 4, 2, 24, seed=Q + K + bq)
    if kw.get("sinks") == "sinks":
        kw["sinks"] = torch.randn(4, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    layout = _layout(2, 4, Q, K, bq, bk, 0.55, seed=K, full_share=0.5)
    _check(_both(q * 2, k, v, layout=layout, **kw))


def test_block_sparse_key_padding_and_value_dim(poison):
    q, k, v = _qkv(2, 50, 50, 2, 1, 16, Dv=8, seed=21)
    kpm = torch.ones(2, 50, dtype=torch.bool, device=DEVICE)
    kpm[0, :20] = False
    _check(_both(q, k, v, causal=True, key_padding_mask=kpm, layout=_layout(2, 2, 50, 50, 16, 16, 0.6, seed=3)))


def test_block_sparse_packed_sequences(poison):
    cu = torch.tensor([0, 20, 20, 57, 90], device=DEVICE)  # per sequence its own layout rows
    q, k, v = _qkv(1, 90, 90, 4, 2, 16, seed=22)
    _check(_both(q, k, v, causal=True, cu_seqlens=cu, layout=_layout(4, 4, 37, 37, 16, 16, 0.6, seed=4)))


def test_block_sparse_dense_layout_equals_exact(poison):
    # every block listed: the sparse path computes exact attention
    q, k, v = _qkv(1, 70, 70, 4, 2, 16, seed=23)
    layout = _layout(1, 4, 70, 70, 16, 32, 2.0, seed=5)
    (out, lse, grads), = [_both(q, k, v, causal=True, layout=layout)[0]]
    (r_out, r_lse, r_grads), _ = _both(q, k, v, causal=True)
    _check(((out, lse, grads), (r_out, r_lse, r_grads)))


def test_block_sparse_empty_layout(poison):
    # nothing listed: every row sees nothing -> zeros, lse -inf, zero gradients
    q, k, v = (t.detach().requires_grad_() for t in _qkv(1, 40, 40, 2, 1, 16, seed=24))
    layout = _layout(1, 2, 40, 40, 16, 16, 0.0, seed=6)
    out, lse = hf_ahfa.attention(q, k, v, causal=True, layout=layout, backend="triton", return_lse=True)
    assert (out == 0).all() and lse.isneginf().all()
    assert all((g == 0).all() for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_block_sparse_layout_errors():
    q, k, v = _qkv(1, 40, 40, 2, 1, 16, seed=25)
    with pytest.raises(ValueError, match="layout must have shape"):
        hf_ahfa.attention(q, k, v, layout=_layout(1, 2, 50, 50, 32, 32, 0.5, seed=1))
    with pytest.raises(ValueError, match="policy or attn_mask"):
        hf_ahfa.attention(q, k, v, layout=_layout(1, 2, 40, 40, 16, 16, 0.5, seed=1), policy=hf_ahfa.AdaptivePolicy())
    with pytest.raises(ValueError, match="block sizes 24x24 must be multiples of 16"):
        hf_ahfa.attention(q, k, v, layout=_layout(1, 2, 40, 40, 24, 24, 0.5, seed=1), backend="triton")


def test_block_sparse_opcheck():
    from hf_ahfa.kernels.sparse import sparse_fwd

    q, k, v = (t.detach().requires_grad_() for t in _qkv(1, 33, 33, 2, 1, 16, seed=26))
    layout = _layout(1, 2, 33, 33, 16, 16, 0.7, seed=7)
    n = torch.tensor([33], device=DEVICE)
    r = layout.resolve(band_blocks(n, n, 16, 16, 3, 3, True, None), element_masks=False, backward=True)
    lists = (r.kv_count, r.kv_index, r.full_count, r.full_index, r.q_count, r.q_index, r.full_q_count, r.full_q_index)
    args = (q, k, v, None, None, None, None, None, 33, 33, True, -1, -1, 0.0, 0.0, 0, 0.25, *lists, 16, 16)
    torch.library.opcheck(sparse_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.fixture
def tma(monkeypatch):
    """The forward loads keys and values through TMA descriptors (``AHFA_TMA=1``); fails a test whose launches
    were not all offered TMA alone."""
    from hf_ahfa.kernels import common, flash

    monkeypatch.setattr(common, "TMA", "1")
    offered = []

    def spy(k, v):
        offered.append(common.tma_modes(k, v))
        return offered[-1]

    monkeypatch.setattr(flash, "tma_modes", spy)
    yield
    assert offered and all(m == (True,) for m in offered), f"load modes per launch: {offered}"


@pytest.mark.parametrize("case", ["causal", "ragged", "gqa_d40", "packed", "sparse", "window_softcap_sinks",
                                  "key_padding"])
def test_tma_loads_match_reference(poison, tma, case):
    """Keys and values through TMA descriptors (rows past the sequence and columns past the head dim read as
    zero) give the reference's outputs and gradients."""
    if case == "causal":
        _check(_both(*_qkv(2, 48, 48, 2, 2, 16, seed=1), causal=True))
    elif case == "ragged":  # key blocks end past K; more keys than queries
        _check(_both(*_qkv(1, 21, 45, 2, 1, 32, seed=2), causal=True))
    elif case == "gqa_d40":  # head dim 40 in 64-wide tiles, value dim 24
        _check(_both(*_qkv(2, 33, 33, 4, 2, 40, Dv=24, seed=3)))
    elif case == "packed":
        cu = torch.tensor([0, 5, 22, 23, 40], device=DEVICE)
        _check(_both(*_qkv(1, 40, 40, 4, 2, 16, seed=4), causal=True, cu_seqlens=cu))
    elif case == "sparse":
        layout = _layout(2, 4, 45, 100, 16, 32, 0.55, seed=5, full_share=0.5)
        _check(_both(*_qkv(2, 45, 100, 4, 2, 16, seed=5), causal=True, layout=layout))
    elif case == "window_softcap_sinks":
        sinks = torch.randn(4, generator=torch.Generator().manual_seed(6)).to(DEVICE)
        _check(_both(*_qkv(2, 40, 40, 4, 4, 16, seed=6), causal=True, window=7, softcap=3.0, sinks=sinks))
    else:  # the visible span starts the key loop inside the sequence (an int64 start on the GPU)
        kpm = torch.ones(2, 50, dtype=torch.bool, device=DEVICE)
        kpm[0, :21] = False
        kpm[1, 37:] = False
        _check(_both(*_qkv(2, 50, 50, 2, 1, 16, seed=7), causal=True, key_padding_mask=kpm))


def test_tma_modes(monkeypatch):
    """``AHFA_TMA``: "0" pointer loads only; "1" TMA alone where the tensors allow it (unit last stride, 16-byte
    aligned base and strides); "auto" offers both on a Hopper GPU, pointers alone under the interpreter."""
    from hf_ahfa.kernels import common

    q, k, v = _qkv(1, 8, 8, 2, 2, 16)
    monkeypatch.setattr(common, "TMA", "0")
    assert common.tma_modes(k, v) == (False,)
    monkeypatch.setattr(common, "TMA", "1")
    assert common.tma_modes(k, v) == (True,)
    assert common.tma_modes(k[..., ::2], v) == (False,)  # last stride 2
    assert common.tma_modes(k, v[:, :, :, 1:]) == (False,)  # base 4 bytes past an aligned one
    assert common.tma_modes(*_qkv(1, 8, 8, 2, 2, 6)[1:]) == (False,)  # a row of 6 float32 is 24 bytes
    monkeypatch.setattr(common, "TMA", "auto")
    if DEVICE == "cpu":
        assert common.tma_modes(k, v) == (False,)
    elif torch.cuda.get_device_capability()[0] >= 9:
        assert common.tma_modes(k, v) == (True, False)
    monkeypatch.setattr(common, "TMA", "1")
    monkeypatch.setattr(common, "TMA_TRITON", False)  # a Triton before 3.6: pointer loads even where asked
    assert common.tma_modes(k, v) == (False,)


def test_kernels_refuse_a_triton_that_cannot_compile_them(monkeypatch):
    """Before triton 3.4 the kernels do not compile (3.2 / 3.3 reject their constexpr tuples): a clear error naming
    the version, which the router turns into its reason for not taking them."""
    from hf_ahfa.kernels import common, flash

    monkeypatch.setattr(common, "TRITON_VERSION", (3, 3))
    with pytest.raises(RuntimeError, match=r"need triton 3\.4 or newer, got"):
        flash.check_supported(torch.empty(0, device=DEVICE))
    monkeypatch.setattr(common, "TRITON_VERSION", (3, 4))
    flash.check_supported(torch.empty(0, device=DEVICE))


def test_forward_offers_no_tma_tile_that_ptxas_crashes_on(monkeypatch):
    """Where a Triton release's TMA variants crash ptxas at some num_stages (``TMA_CRASH_STAGES``), the forward
    offers those tiles with pointer loads only, the others with both load modes, and computes the same."""
    from hf_ahfa.kernels import common, configs, flash, tuning

    monkeypatch.setattr(tuning, "_AUTOTUNE", False)  # (timing needs a GPU) the first candidate runs
    monkeypatch.setattr(common, "TMA", "1")
    monkeypatch.setattr(common, "TMA_CRASH_STAGES", (2,))
    modes = common.tma_modes
    monkeypatch.setattr(flash, "tma_modes", lambda k, v: (*modes(k, v), False))  # as "auto" on a Hopper GPU
    tile = configs.candidates(configs.FWD, torch.device(DEVICE), 16)[0][:3]
    monkeypatch.setattr(configs, "candidates", lambda *a: [(*tile, 2), (*tile, 3)])
    offered = []
    launch_tuned = flash.launch_tuned

    def spy(key, cands, run):
        offered.append([c[3:] for c in cands])  # (num_stages, TMA) of each candidate
        return launch_tuned(key, cands, run)

    monkeypatch.setattr(flash, "launch_tuned", spy)
    _check(_both(*_qkv(1, 40, 40, 2, 1, 16, seed=8), grad=False, causal=True))
    assert offered[0] == [(3, True), (2, False), (3, False)], offered


@pytest.mark.parametrize("B,Q,H,DV", [(2, 37, 3, 24), (1, 5, 1, 80)])
def test_backward_delta_kernel(B, Q, H, DV):
    """The backward's ``delta = rowsum(dO * O)`` kernel equals the float32 PyTorch sum, on strided inputs."""
    from hf_ahfa.kernels.flash import _delta

    g = torch.Generator().manual_seed(Q)
    out = torch.randn(B, H, Q, DV, generator=g).to(DEVICE, torch.float16).transpose(1, 2)
    grad_out = torch.randn(B, Q, H, DV, generator=g).to(DEVICE, torch.float16)
    expect = (grad_out.float() * out.float()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(_delta(grad_out, out), expect, rtol=1e-5, atol=1e-5)
