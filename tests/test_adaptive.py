"""The adaptive mode: estimator kernel vs its reference, block selection, policy plumbing, per-head
fallback, and the whole path through Transformers (CPU: Triton interpreter, small shapes)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_ahfa
from hf_ahfa.estimate import estimate_mass_reference, sample_queries
from hf_ahfa.select import anchor_blocks, select_blocks
from hf_ahfa.block_layout import LIST_FIELDS, band_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qk(B, Q, K, H, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Q, H, D, generator=g).to(DEVICE), torch.randn(B, K, Hkv, D, generator=g).to(DEVICE),
            torch.randn(B, K, Hkv, D, generator=g).to(DEVICE))


def _policy(**kw):
    return hf_ahfa.AdaptivePolicy(**{"mode": "adaptive", "block_size": 16, "stride": 8, **kw})


@pytest.mark.parametrize("Q,K,stride,bk,causal,window,softcap,kpm", [
    (100, 130, 16, 16, True, None, None, False),
    (96, 96, 8, 32, False, (20, 5), None, False),
    (64, 64, 16, 32, True, (40, 0), 5.0, False),
    (50, 70, 8, 16, True, None, None, True),
])
@pytest.mark.parametrize("chunk", [3, 16])  # key blocks per program: several chunks per row tile, or one
def test_estimator_matches_reference(Q, K, stride, bk, causal, window, softcap, kpm, chunk, monkeypatch):
    from hf_ahfa.kernels import estimate
    from hf_ahfa.kernels.estimate import estimate_mass

    monkeypatch.setattr(estimate, "ESTIMATE_CHUNK", chunk)
    monkeypatch.setattr(estimate, "MIN_PROGRAMS", 0)  # these calls are tiny: keep the chunk asked for

    q, k, _ = _qk(2, Q, K, 4, 2, 40, seed=Q + K)
    q = q * 2  # peaked attention: the selection below is not a coin toss
    pad = None
    if kpm:
        pad = torch.ones(2, K, dtype=torch.bool, device=DEVICE)
        pad[0, :15] = False
    qs = sample_queries(q, stride)
    got = estimate_mass(qs, k, pad, Q, stride, bk, causal, *(window or (-1, -1)), softcap or 0.0, 40**-0.5)
    want = estimate_mass_reference(qs, k, pad, Q, stride, bk, causal, window, softcap, 40**-0.5)
    assert (got - want).abs().max() < 1e-5
    sums = got.sum(-1)
    assert ((sums - 1).abs() < 1e-5).all()  # every sampled row sees a key here
    # the same selection from both: the production path and its reference pick identical blocks
    policy = _policy(stride=stride, block_size=bk)
    lens = torch.tensor([Q], device=DEVICE), torch.tensor([K], device=DEVICE)
    if bk % stride == 0:
        touched, _ = band_blocks(*lens, bk, bk, -(-Q // bk), -(-K // bk), causal, window)
        anchors = anchor_blocks(Q, K, policy, causal, DEVICE)
        pick = [select_blocks(e, touched, anchors, 0.9, 1.0, bk // stride)[0]
                for e in (got, want)]
        assert torch.equal(*pick)


def test_estimator_chunks_shrink_where_the_gpu_would_go_idle():
    from hf_ahfa.kernels.estimate import MIN_PROGRAMS, estimate_chunk

    assert estimate_chunk(32 * 256 * 14) == 16  # 32K tokens, 14 heads: 7168 programs of 16 key blocks
    assert estimate_chunk(8 * 64 * 9) == 2  # 8K, 9 heads: 2304 programs of 2
    assert estimate_chunk(MIN_PROGRAMS - 1) == 1
    assert all(estimate_chunk(n) * MIN_PROGRAMS <= max(n, MIN_PROGRAMS) for n in (1, 3000, 5000, 40000, 10**6))


def test_sample_queries_takes_the_last_row_of_each_group():
    q = torch.arange(2 * 10 * 1 * 3, dtype=torch.float32).view(2, 10, 1, 3)
    qs = sample_queries(q, 4)
    assert qs.shape == (2, 3, 1, 3)
    assert torch.equal(qs, q[:, [3, 7, 9]])


def test_select_blocks_fewest_reaching_tau_plus_anchors():
    mass = torch.tensor([[[[0.05, 0.5, 0.3, 0.1, 0.05, 0.0]]]])
    touched = torch.tensor([True] * 5 + [False]).view(1, 1, 1, 6)
    no_anchor = torch.zeros(1, 1, 1, 6, dtype=torch.bool)
    keep, dense = select_blocks(mass, touched, no_anchor, 0.75, 1.0)
    assert keep[0, 0, 0].tolist() == [False, True, True, False, False, False] and not dense.any()
    keep, _ = select_blocks(mass, touched, no_anchor, 0.85, 1.0)
    assert keep[0, 0, 0].tolist() == [False, True, True, True, False, False]
    anchors = torch.tensor([True, False, False, False, True, True]).view(1, 1, 1, 6)
    keep, _ = select_blocks(mass, touched, anchors, 0.75, 1.0)
    assert keep[0, 0, 0].tolist() == [True, True, True, False, True, False]  # untouched stays out
    keep, dense = select_blocks(mass, touched, anchors, 0.75, 0.5)  # 4 of 5 > 0.5: head falls back
    assert dense.all() and torch.equal(keep, touched)
    keep, _ = select_blocks(mass, touched, no_anchor, 1.0, 1.0)
    assert torch.equal(keep, touched)


def test_select_blocks_keeps_what_every_sampled_row_needs():
    # three rows of a query block look at key block 1, the fourth at blocks 2 and 3: the block mean
    # (0.75, 0.15, 0.1) reaches 0.8 with blocks 1 and 2 and leaves the fourth row 0.6 of its mass
    rows = torch.tensor([[0, 1.0, 0, 0]] * 3 + [[0, 0, 0.6, 0.4]])  # 4 sampled rows x key blocks 0..3
    mass = rows[None, None]  # (1, 1, 4 rows, 4 key blocks), one query block
    touched = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    no_anchor = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    keep, _ = select_blocks(mass, touched, no_anchor, 0.8, 1.0, rows_per_block=4)
    assert keep[0, 0, 0].tolist() == [False, True, True, True]
    # one estimate per block (the rows' mean) keeps the two heaviest
    keep, _ = select_blocks(mass.mean(2, keepdim=True), touched, no_anchor, 0.8, 1.0)
    assert keep[0, 0, 0].tolist() == [False, True, True, False]


@pytest.mark.parametrize("seed", range(4))
def test_select_blocks_every_sampled_row_reaches_tau(seed):
    g = torch.Generator().manual_seed(seed)
    B, H, NQ, per, NK, tau = 2, 3, 5, 4, 7, 0.9
    NR = NQ * per - 3  # a short last block
    mass = torch.rand(B, H, NR, NK, generator=g) ** 4  # peaked rows
    mass[0, 0, 2] = 0  # a row that sees nothing keeps nothing
    touched = torch.ones(1, 1, NQ, NK, dtype=torch.bool)
    no_anchor = torch.zeros(1, 1, NQ, NK, dtype=torch.bool)
    keep, dense = select_blocks(mass, touched, no_anchor, tau, 1.0, rows_per_block=per)
    assert not dense.any() and not keep.all()
    per_row = keep.repeat_interleave(per, 2)[:, :, :NR]
    share = (mass * per_row).sum(-1) / mass.sum(-1).clamp_min(1e-30)
    assert (share[mass.sum(-1) > 0] >= tau - 1e-6).all()


def _tiles(B, H, NR, NK, seed):
    """Random estimator tiles: log2-domain maxima (some blocks unseen: -inf, sum 0) and sums of exponentials; head
    ``h``'s maxima spread ``2 + 4 h`` (flat to peaked heads)."""
    g = torch.Generator().manual_seed(seed)
    tile_max = torch.randn(B, H, NR, NK, generator=g) * (2 + 4 * torch.arange(H))[:, None, None]
    tile_sum = torch.rand(B, H, NR, NK, generator=g) * 8 + 1
    unseen = torch.rand(B, H, NR, NK, generator=g) < 0.2
    return tile_max.masked_fill(unseen, float("-inf")).to(DEVICE), tile_sum.masked_fill(unseen, 0.0).to(DEVICE)


@pytest.mark.parametrize("Q,K,bs,stride,causal,window,element_masks,tau,density_limit", [
    (200, 260, 32, 8, True, None, False, 0.9, 1.0),  # keys past the queries, a short last query block
    (96, 96, 16, 4, False, (40, 10), False, 0.8, 1.0),  # a two-sided window
    (130, 130, 32, 16, True, (70, 0), True, 0.95, 1.0),  # one sampled row per block's edge; element masks
    (160, 160, 32, 8, True, None, False, 0.9, 0.95),  # some heads fall back to every visible block
    (128, 384, 16, 8, True, None, False, 0.7, 1.0),  # 24 key blocks, a sparse selection
    (170, 200, 48, 16, True, None, False, 0.8, 1.0),  # three sampled rows per block (not a power of two)
    (96, 128, 32, 8, False, None, False, 1.0, 1.0),  # tau 1: every visible block
])
@pytest.mark.parametrize("backward", [False, True])
def test_selection_kernels_match_the_reference(Q, K, bs, stride, causal, window, element_masks, tau, density_limit,
                                               backward):
    from hf_ahfa.kernels.estimate import mass_of_tiles
    from hf_ahfa.select import select_layout, select_layout_of_tiles

    B, H = 2, 3
    policy = _policy(block_size=bs, stride=stride, tau=tau, density_limit=density_limit)
    NR = -(-Q // stride)
    tiles = _tiles(B, H, NR, -(-K // bs), seed=Q + K + bs)
    shape = dict(causal=causal, window=window, element_masks=element_masks, backward=backward)
    # as the estimator leaves them: -inf / 0 in the blocks its row's query block does not touch
    visible = select_layout(mass_of_tiles(*tiles), Q, K, policy, **shape)[2].reshape(-(-Q // bs), -1)
    row_block = (torch.arange(NR) * stride + stride - 1).clamp_max(Q - 1) // bs
    unseen = ~visible[row_block.to(visible.device)]
    tiles = (tiles[0].masked_fill(unseen, float("-inf")), tiles[1].masked_fill(unseen, 0.0))
    want, want_dense, want_visible = select_layout(mass_of_tiles(*tiles), Q, K, policy, **shape)
    got, got_dense, got_visible = select_layout_of_tiles(tiles, Q, K, policy, **shape)
    assert torch.equal(got_dense, want_dense) and torch.equal(got_visible, want_visible)
    if density_limit < 1.0:
        assert 0 < want_dense.sum() < B * H  # the case covers both kinds of head
    for name in LIST_FIELDS:
        w, g = getattr(want, name), getattr(got, name)
        assert (g is None) == (w is None) == (not backward and name.startswith(("q_", "full_q"))), name
        if w is not None:
            assert g.dtype == torch.int32 and g.is_contiguous() and torch.equal(g, w), name
    assert got.to_dense().any() and (tau == 1.0 or not torch.equal(got.to_dense(), want_visible.expand(B, H, -1, -1)))


@pytest.mark.parametrize("backward", [False, True])
def test_estimator_and_selection_opcheck(backward):
    """The ops' schemas and fake tensors (what torch.compile traces) agree with what they compute."""
    from hf_ahfa.kernels.estimate import estimate_tiles
    from hf_ahfa.kernels.select import select_lists
    from hf_ahfa.select import _kernel_band

    q, k, _ = _qk(1, 64, 80, 2, 1, 16, seed=3)
    qs = sample_queries(q, 8)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(estimate_tiles, (qs, k, None, 64, 8, 16, True, -1, -1, 0.0, 0.25), test_utils=utils)
    tiles = estimate_tiles(qs, k, None, 64, 8, 16, True, -1, -1, 0.0, 0.25)
    touched, full, anchors, limit, _ = _kernel_band(64, 80, _policy(tau=0.9), True, None, q.device)
    torch.library.opcheck(select_lists, (*tiles, touched, full, anchors, limit, 0.9, 2, False, backward),
                          test_utils=utils)


def test_selection_kernel_keeps_every_block_tied_at_the_threshold():
    # one row: 0.4 and three blocks of 0.2; tau 0.5 needs 0.4 and one 0.2. The reference's sort keeps one of the
    # tied blocks, the kernel (a threshold on the mass) all three. (Block 4 is also the query block's diagonal,
    # the one anchor kept here: 16 queries aligned bottom-right against 80 keys.)
    from hf_ahfa.select import select_layout, select_layout_of_tiles

    mass = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.4]).to(DEVICE)
    tiles = (torch.where(mass > 0, 0.0, float("-inf"))[None, None, None], mass[None, None, None] * 3)
    policy = _policy(block_size=16, stride=16, tau=0.5, density_limit=1.0, sink_blocks=0, local_blocks=1)
    shape = dict(causal=False, window=None, element_masks=False, backward=False)
    got = select_layout_of_tiles(tiles, 16, 80, policy, **shape)[0].to_dense()[0, 0, 0].tolist()
    want = select_layout(tiles[1] / 3, 16, 80, policy, **shape)[0].to_dense()[0, 0, 0].tolist()
    assert got == [False, True, True, True, True]
    assert want[4] and not want[0] and sum(want) == 2


def test_anchor_blocks_sink_and_local():
    policy = hf_ahfa.AdaptivePolicy(block_size=16, stride=8, sink_blocks=1, local_blocks=2)
    a = anchor_blocks(64, 64, policy, True, "cpu")[0, 0]
    assert a.tolist() == [[True, False, False, False], [True, True, False, False],
                          [True, True, True, False], [True, False, True, True]]


def test_tau_one_equals_exact():
    q, k, v = (t.requires_grad_() for t in _qk(1, 80, 80, 4, 2, 16, seed=1))
    exact = hf_ahfa.attention(q, k, v, causal=True, backend="triton")
    with hf_ahfa.record() as rec:
        sparse = hf_ahfa.attention(q, k, v, causal=True, backend="triton", policy=_policy(tau=1.0, density_limit=1.0))
    assert rec[0]["path"] == "sparse" and rec[0]["density"] == 1.0
    assert (sparse - exact).abs().max() < 2e-6
    g = torch.randn_like(exact)
    for a, b in zip(torch.autograd.grad(sparse, (q, k, v), g), torch.autograd.grad(exact, (q, k, v), g)):
        assert (a - b).abs().max() < 1e-5


def test_sparse_selection_matches_its_reference_end_to_end():
    # the whole adaptive path: Triton (estimator + sparse kernels) vs reference (estimator + masked attention)
    q, k, v = _qk(2, 96, 96, 4, 2, 16, seed=2)
    q = q * 3
    policy = _policy(tau=0.5, local_blocks=1, density_limit=1.0)
    with hf_ahfa.record() as rec:
        got = hf_ahfa.attention(q, k, v, causal=True, backend="triton", policy=policy)
        want = hf_ahfa.attention(q, k, v, causal=True, backend="reference", policy=policy)
    assert rec[0]["density"] == rec[1]["density"] < 0.9
    assert (got - want).abs().max() < 2e-5
    assert (got - hf_ahfa.attention(q, k, v, causal=True, backend="reference")).abs().max() > 1e-3  # really sparse


def test_per_head_fallback():
    # head 0: queries 0 -> uniform attention, the estimate is dense -> exact; head 1: peaked on the sink
    q, k, v = _qk(1, 128, 128, 2, 2, 16, seed=3)
    q[..., 0, :] = 0
    k[:, :4, 1] = 0
    q[..., 1, :] = 0
    q[..., 1, 0] = 30.0
    k[:, :4, 1, 0] = 1.0
    policy = _policy(tau=0.9, density_limit=0.6, local_blocks=1)
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, causal=True, backend="triton", policy=policy)
    (entry,) = rec
    assert entry["dense_heads"] == 1 and entry["head_density"][0] == 1.0 and entry["head_density"][1] < 0.6
    exact = hf_ahfa.attention(q, k, v, causal=True, backend="triton")
    assert (out[:, :, 0] - exact[:, :, 0]).abs().max() < 2e-6


def test_exact_reasons_and_all_dense_heads():
    q, k, v = _qk(1, 64, 64, 2, 1, 16, seed=4)
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, causal=True, backend="triton", policy=_policy(mode="exact"))
        hf_ahfa.attention(q[:, :20], k, v, causal=True, backend="triton", policy=_policy())
        hf_ahfa.attention(q, k, v, causal=True, backend="triton", policy=_policy(mode="auto", min_length=100))
        hf_ahfa.attention(q, k, v, causal=True, window=8, backend="triton", policy=_policy())
        out = hf_ahfa.attention(q, k, v, causal=True, backend="triton", policy=_policy(tau=1.0, density_limit=0.5))
    reasons = [r["reason"] for r in rec]
    assert reasons[0] == "mode=exact" and "two blocks" in reasons[1] and "min_length" in reasons[2]
    assert "sliding window" in reasons[3]
    # every head dense: the sparse kernels list every visible block (no host sync to switch paths)
    assert rec[4]["path"] == "sparse" and rec[4]["dense_heads"] == 2 and rec[4]["density"] == 1.0
    assert (out - hf_ahfa.attention(q, k, v, causal=True, backend="triton")).abs().max() < 2e-6


def _fake_timings(monkeypatch, times: dict):
    """The router's timing (hf_ahfa.fastest) on the suite's device: each candidate takes ``times[name]`` ms; returns
    the list of timed candidate sets. Auto times on the CPU here too (``router.AUTO_TIMED_DEVICES``)."""
    from hf_ahfa import fastest, router

    timed = []
    monkeypatch.setattr(fastest, "_times", {})
    monkeypatch.setattr(fastest, "_decided", {})
    monkeypatch.setattr(fastest, "_median_ms",
                        lambda cands, device: timed.append(sorted(cands)) or {n: times[n] for n in cands})
    monkeypatch.setattr(router, "AUTO_TIMED_DEVICES", frozenset({DEVICE}))
    return timed


@pytest.mark.parametrize("adaptive_ms,route", [(0.5, "adaptive"), (0.97, "flash"), (2.0, "flash")])
def test_auto_runs_block_sparse_only_where_it_was_timed_faster(monkeypatch, adaptive_ms, route):
    """mode="auto" times the whole block-sparse call (estimator and selection included) against the exact route
    once per layer and shape, and runs block-sparse only where that was more than SDPA_MARGIN faster; otherwise
    exact, the reason recorded. The timing runs leave no entries in record(); the decision is cached."""
    import dataclasses

    from hf_ahfa import router

    monkeypatch.setenv("AHFA_BACKEND", "triton")
    q, k, v = _qk(1, 128, 128, 2, 1, 16, seed=5)
    auto = _policy(mode="auto", min_length=32, tau=0.3, density_limit=1.0)
    sparse = hf_ahfa.attention(q, k, v, causal=True, policy=dataclasses.replace(auto, mode="adaptive"))
    exact = hf_ahfa.attention(q, k, v, causal=True)
    timed = _fake_timings(monkeypatch, {"exact": 1.0, "adaptive": adaptive_ms})
    for _ in range(2):
        with hf_ahfa.record() as rec:
            out = hf_ahfa.attention(q, k, v, causal=True, policy=auto)
        assert [r["route"] for r in rec] == [route]
        if route == "adaptive":
            assert torch.equal(out, sparse) and 0 < rec[0]["density"] < 1
        else:
            assert rec[0]["reason"].startswith("auto: block-sparse attention (estimator included) was not timed")
            assert torch.equal(out, exact)
    assert timed == [["adaptive", "exact"]]  # once: the second call took the cached decision
    assert router.SDPA_MARGIN == 0.05  # the parametrised 0.97 ms lies inside it


def test_auto_decides_per_layer_and_runs_as_selected_where_nothing_is_timed(monkeypatch):
    """Each model layer (Transformers' layer_idx) gets its own timed decision, calls from outside a model one per
    shape; off the timed devices (the interpreter's kernels) and without the Triton kernels nothing is timed: auto
    runs as selected, or exact without the kernels."""
    from types import SimpleNamespace

    from hf_ahfa import integration, router

    monkeypatch.setenv("AHFA_BACKEND", "triton")
    fields = dict(mode="auto", block_size=16, stride=8, min_length=32, tau=0.3, density_limit=1.0)
    q, k, v = (t.transpose(1, 2) for t in _qk(1, 64, 64, 2, 1, 16, seed=6))  # Transformers' (B, H, T, D)

    def layer_call(idx):
        module = SimpleNamespace(is_causal=True, layer_idx=idx, config=SimpleNamespace(ahfa=fields))
        with hf_ahfa.record() as rec:
            integration.ahfa_attention_forward(module, q, k, v, None)
        return rec[0]["route"]

    def plain_call():
        with hf_ahfa.record() as rec:
            hf_ahfa.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True,
                              policy=hf_ahfa.AdaptivePolicy(**fields))
        return rec[0]["route"]

    assert router.AUTO_TIMED_DEVICES == {"cuda"}  # the interpreter's timings would say nothing about a GPU's
    monkeypatch.setattr(router, "AUTO_TIMED_DEVICES", frozenset())  # (on CUDA too: no real timing in this test)
    assert layer_call(3) == "adaptive" and plain_call() == "adaptive"
    timed = _fake_timings(monkeypatch, {"exact": 1.0, "adaptive": 0.5})
    assert [layer_call(3), layer_call(3), layer_call(4), plain_call(), plain_call()] == ["adaptive"] * 5
    assert len(timed) == 3  # layer 3, layer 4, no layer
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, backend="reference",
                          policy=hf_ahfa.AdaptivePolicy(**fields))
    assert rec[0]["route"] == "reference" and "without the Triton kernels" in rec[0]["reason"]
    assert len(timed) == 3


def test_policy_validation_names_the_field():
    for kw, field in [({"mode": "fast"}, "mode"), ({"tau": 0.0}, "tau"), ({"block_size": 100}, "block_size"),
                      ({"stride": 48}, "stride"), ({"density_limit": 2}, "density_limit"), ({"local_blocks": 0}, "local")]:
        with pytest.raises(ValueError, match=field):
            hf_ahfa.AdaptivePolicy(**kw)
    with pytest.raises(ValueError, match="unknown ahfa policy field"):
        with hf_ahfa.override(taus=0.9):
            pass


def _tiny_llama():
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256, initializer_range=0.2,
        attn_implementation="ahfa")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(DEVICE).eval()


def test_configure_persists_with_save_pretrained_and_override_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("AHFA_BACKEND", "triton")
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        exact = model(ids).logits
        hf_ahfa.configure(model, mode="adaptive", tau=1.0, block_size=16, stride=8, density_limit=1.0)
        with hf_ahfa.record() as rec:
            same = model(ids).logits
        assert [r["layer"] for r in rec] == [0, 1] and all(r["path"] == "sparse" for r in rec)
        assert (same - exact).abs().max() < 1e-4
        model.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ahfa").to(DEVICE).eval()
        assert hf_ahfa.policy.policy_of(loaded.config) == hf_ahfa.AdaptivePolicy(
            mode="adaptive", tau=1.0, block_size=16, stride=8, density_limit=1.0)
        hf_ahfa.configure(loaded, tau=0.5)
        with hf_ahfa.record() as rec:
            sparse = loaded(ids).logits
        assert all(r["density"] < 1.0 for r in rec)
        with hf_ahfa.override(mode="exact"), hf_ahfa.record() as rec:
            again = loaded(ids).logits
        assert all(r["reason"] == "mode=exact" for r in rec)
        assert (again - exact).abs().max() < 1e-4 and (sparse - exact).abs().max() > 1e-4


def test_policy_of_reuses_the_policy_and_sees_every_change():
    """Every attention call asks for its policy: the same object comes back while nothing changed, and a
    configure, an edit of config.ahfa in place, an override, or a new stored dict give the new policy."""
    from types import SimpleNamespace

    from hf_ahfa.policy import policy_of

    config = SimpleNamespace(ahfa=hf_ahfa.AdaptivePolicy(mode="adaptive", tau=0.95).to_dict())
    first = policy_of(config)
    assert policy_of(config) is first and first.tau == 0.95
    config.ahfa["tau"] = 0.9  # edited in place
    assert policy_of(config).tau == 0.9
    with hf_ahfa.override(mode="exact"):
        assert policy_of(config).mode == "exact"
        with hf_ahfa.override(tau=0.8):
            assert (policy_of(config).mode, policy_of(config).tau) == ("exact", 0.8)
    assert policy_of(config) == hf_ahfa.AdaptivePolicy(mode="adaptive", tau=0.9)
    hf_ahfa.configure(config, block_size=64)  # a new dict
    assert policy_of(config).block_size == 64 and policy_of(config).tau == 0.9
    config.ahfa = {}
    assert policy_of(config) is policy_of(None) == hf_ahfa.AdaptivePolicy()
    layered = hf_ahfa.AdaptivePolicy(mode="adaptive", layers=((0, "exact", 0.99), (2, "adaptive", 0.9)))
    assert layered.for_layer(2) is layered.for_layer(2)
    assert (layered.for_layer(2).mode, layered.for_layer(2).tau, layered.for_layer(2).layers) == ("adaptive", 0.9, ())
    assert layered.for_layer(0).mode == "exact" and layered.for_layer(1) is layered


def test_policy_of_reads_config_ahfa_however_the_config_supplies_it():
    """policy_of reads config.ahfa from the instance's __dict__ (a missing attribute is slow on PreTrainedConfig);
    a policy on a real config, a class attribute, a property, an attribute map and __getattr__ still reach it."""
    from transformers import AutoConfig

    from hf_ahfa.policy import policy_of

    stored = hf_ahfa.AdaptivePolicy(mode="adaptive", tau=0.9).to_dict()
    config = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2)
    assert policy_of(config) == hf_ahfa.AdaptivePolicy()
    hf_ahfa.configure(config, mode="adaptive", tau=0.9)
    assert policy_of(config).tau == 0.9

    class ClassAttribute:
        ahfa = stored

    class Property:
        ahfa = property(lambda self: stored)

    class Mapped:
        attribute_map = {"ahfa": "policy"}

        def __init__(self):
            self.policy = stored

        def __getattribute__(self, name):
            return super().__getattribute__(self.attribute_map.get(name, name) if name != "attribute_map" else name)

    class Dynamic:
        def __getattr__(self, name):
            if name == "ahfa":
                return stored
            raise AttributeError(name)

    class Slots:
        __slots__ = ("ahfa",)

        def __init__(self):
            self.ahfa = stored

    for kind in (ClassAttribute, Property, Mapped, Dynamic, Slots):
        assert policy_of(kind()).tau == 0.9, kind.__name__


def test_generate_decodes_exact_after_sparse_prefill(monkeypatch):
    monkeypatch.setenv("AHFA_BACKEND", "triton")
    model = _tiny_llama()
    hf_ahfa.configure(model, mode="adaptive", tau=1.0, block_size=16, stride=8, density_limit=1.0)
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with hf_ahfa.record() as rec:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    with hf_ahfa.override(mode="exact"):
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    paths = [r["path"] for r in rec]
    assert paths[:2] == ["sparse", "sparse"] and set(paths[2:]) == {"exact"}


def test_training_step_through_sparse_kernels(monkeypatch):
    monkeypatch.setenv("AHFA_BACKEND", "triton")
    model = _tiny_llama().train()
    hf_ahfa.configure(model, mode="adaptive", tau=0.6, block_size=16, stride=8)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.isfinite().all() for g in grads)


def test_estimate_layout_is_what_the_adaptive_path_keeps():
    g = torch.Generator(DEVICE).manual_seed(11)
    q = torch.randn(1, 96, 4, 16, device=DEVICE, generator=g) * 3
    k, v = (torch.randn(1, 96, 2, 16, device=DEVICE, generator=g) for _ in range(2))
    policy = _policy(tau=0.7)
    layout = hf_ahfa.estimate_layout(q, k, policy, causal=True, backend="reference")
    causal = band_blocks(torch.tensor([96]), torch.tensor([96]), 16, 16, 6, 6, True, None)[0].to(DEVICE)
    kept = layout.to_dense()
    assert layout.shape == (1, 4, 6, 6) and not (kept & ~causal).any() and kept.diagonal(dim1=-2, dim2=-1).all()
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, causal=True, policy=policy, backend="reference")
    assert rec[0]["density"] == pytest.approx(layout.density(allowed=causal))
    full = hf_ahfa.estimate_layout(q, k, _policy(tau=1.0), causal=True, backend="reference")
    assert torch.equal(full.to_dense(), causal.expand(1, 4, 6, 6))


def _faint_first_block(Q, D, block, seed):
    """Causal q/k/v where the first key block holds a faint share of every later query's attention (its keys
    point away from the queries) and the other blocks hold the rest."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Q, 2, D, generator=g).abs() + 1.0
    k = torch.randn(1, Q, 2, D, generator=g) * 0.3
    k[:, :block] = -q[:, :block].mean()  # scaled scores near -13 against about +-0.6 for the other keys
    v = torch.randn(1, Q, 2, D, generator=g)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("skip_mass", [0.0, 1e-9, 0.01])
def test_tile_skipping_is_exact_attention_over_the_kept_keys(skip_mass, monkeypatch):
    """Error-bounded skipping inside the kept blocks (issue 12, item 4): with every block kept (tau = 1), a
    faint first key block is skipped for the later query rows where its share of their mass is within the
    bound, and the result is exact attention over the other keys; 0 (or a bound below the share) computes
    every tile; the left-out share is within the bound and the output within 2 * skip_mass * max|v|."""
    monkeypatch.setenv("AHFA_BACKEND", "triton")
    block = 16 if DEVICE == "cpu" else 128  # the kernels' tile under the interpreter / on a GPU
    Q, D = 4 * block, 16
    q, k, v = _faint_first_block(Q, D, block, seed=3)
    policy = _policy(tau=1.0, density_limit=1.0, block_size=block, stride=8, skip_mass=skip_mass)
    out = hf_ahfa.attention(q, k, v, causal=True, policy=policy)
    exact, lse = hf_ahfa.attention(q, k, v, causal=True, backend="reference", return_lse=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D**-0.5
    share = (scores[..., :block].exp().sum(-1) / lse.double().exp())[:, :, block:]  # faint block's share
    assert share.max() < 0.01  # the construction: faint, but not nothing
    if skip_mass < share.min():
        torch.testing.assert_close(out, exact, atol=2e-5, rtol=2e-5)
        return
    keep = torch.ones(1, 1, Q, Q, dtype=torch.bool, device=DEVICE).tril()
    keep[..., block:, :block] = False  # what skipping leaves out: the faint block, for rows past it
    kept = hf_ahfa.attention(q, k, v, attn_mask=keep, backend="reference")
    torch.testing.assert_close(out, kept, atol=2e-5, rtol=2e-5)
    assert share.max() <= skip_mass
    assert (out - exact).abs().max() <= 2 * skip_mass * v.abs().max()
    assert (out - exact).abs().max() > 1e-6  # it did skip


def test_tile_skipping_is_for_inference_only():
    from hf_ahfa.kernels.sparse import sparse_fwd

    with pytest.raises(ValueError, match="skip_mass must be in"):
        hf_ahfa.AdaptivePolicy(skip_mass=1.0)
    q = torch.randn(1, 32, 1, 16)
    one = torch.ones(1, 1, 2, dtype=torch.int32)
    lists = dict(count=one, index=torch.zeros(1, 1, 2, 2, dtype=torch.int32), full_count=0 * one,
                 full_index=torch.zeros(1, 1, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="skip_mass > 0 is for inference"):
        sparse_fwd(q, q, q, None, None, None, None, None, 32, 32, True, -1, -1, 0.0, 0.1, 0, 0.25, **lists,
                   t_count=None, t_index=None, t_full_count=None, t_full_index=None, block_q=16, block_k=16,
                   skip_mass=0.01)


@pytest.mark.parametrize("Q,K,window", [(128, 128, None), (96, 160, None), (128, 128, (40, 0))])
def test_tile_skipping_matches_its_reference_tile_by_tile(Q, K, window):
    """The kernel's skipping rule replayed in PyTorch (``skip_reference``, the interpreter's 16 x 16 tiles, two
    tiles per layout block each way): same output at every bound, same tiles left out (a tile decided otherwise
    moves the output by far more than the tolerance), and some tiles are left out at the larger bounds."""
    from hf_ahfa.block_layout import BlockLayout
    from hf_ahfa.block_sparse import layout_band, skip_reference, sparse_kernels, sparse_reference
    from hf_ahfa.spec import make_call

    if DEVICE != "cpu":
        pytest.skip("the reference replays the interpreter's 16 x 16 tiles")
    g = torch.Generator().manual_seed(Q + K)
    q = torch.randn(1, Q, 2, 16, generator=g) * 1.5  # peaked rows: faint tiles to skip
    k, v = torch.randn(1, K, 1, 16, generator=g), torch.randn(1, K, 1, 16, generator=g)
    call = make_call(q, k, v, causal=True, window=window)
    sel = torch.rand(1, 2, -(-Q // 32), -(-K // 32), generator=g) < 0.7
    band = layout_band(call, 32, 32, Q, K, "cpu")
    lay = BlockLayout.from_dense(sel, 32, 32, Q, K).resolve(band, element_masks=False, backward=False)
    exact, _ = sparse_reference(q, k, v, lay, call)
    shares = []
    for skip_mass in (0.0, 0.002, 0.05, 0.3):
        out, _ = sparse_kernels(q, k, v, lay, call, skip_mass=skip_mass)
        ref, share = skip_reference(q, k, v, lay, call, skip_mass, 16, 16)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        assert (ref - exact).abs().max() <= 2 * skip_mass * v.abs().max() + 1e-5
        shares.append(share)
    assert shares[0] == 0 and shares == sorted(shares) and shares[-1] > 0.1
