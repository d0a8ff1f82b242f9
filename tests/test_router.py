"""The router: which path each call takes (as ``record()`` reports it), and that each path is exact."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import hf_ahfa
from hf_ahfa.router import DECODE_MAX_Q, DECODE_MIN_K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(Q, K, seed, requires_grad=False):
    g = torch.Generator(DEVICE).manual_seed(seed)
    q = torch.randn(1, Q, 4, 16, device=DEVICE, generator=g)
    k, v = (torch.randn(1, K, 2, 16, device=DEVICE, generator=g) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _routed(backend, q, k, v, **kw):
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, causal=True, backend=backend, **kw)
    assert len(rec) == 1
    return rec[0], out


@pytest.mark.parametrize("backend,Q,K,grad,want", [
    ("reference", 3, DECODE_MIN_K, False, "reference"),
    ("triton", 3, DECODE_MIN_K, False, "decode"),
    ("triton", DECODE_MAX_Q + 1, DECODE_MIN_K, False, "flash"),  # too many queries for split-KV
    ("triton", 3, DECODE_MIN_K - 1, False, "flash"),  # too few keys to split
    ("triton", 3, DECODE_MIN_K, True, "flash"),  # training needs the dense path's backward
])
def test_exact_routes(backend, Q, K, grad, want, oracle):
    q, k, v = _qkv(Q, K, seed=Q + K, requires_grad=grad)
    entry, out = _routed(backend, q, k, v)
    assert (entry["route"], entry["path"], entry["backend"]) == (want, "exact", backend)
    assert (entry["q_len"], entry["k_len"], entry["dtype"]) == (Q, K, "float32")
    expected = oracle(q, k, v, causal=True)[0]
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("Q,K,grad,op", [(3, DECODE_MIN_K, False, "flash_decode"), (40, 40, False, "flash_fwd"),
                                        (40, 40, True, "flash_fwd")])
def test_custom_ops_only_where_autograd_needs_them(monkeypatch, Q, K, grad, op):
    """Eager inference calls run the kernels' launch functions without the custom op's dispatch (host time per
    call); a call that needs a gradient goes through the op and its autograd."""
    import hf_ahfa.kernels.flash as flash

    used = []
    real = getattr(flash, op)
    monkeypatch.setattr(flash, op, lambda *a, **kw: used.append(op) or real(*a, **kw))
    q, k, v = _qkv(Q, K, seed=5, requires_grad=grad)
    out = hf_ahfa.attention(q, k, v, causal=True, backend="triton")
    assert used == ([op] if grad else [])
    if grad:
        out.sum().backward()
        assert q.grad is not None and k.grad is not None


def test_adaptive_and_layout_routes():
    q, k, v = _qkv(64, 64, seed=3)
    policy = hf_ahfa.AdaptivePolicy(mode="adaptive", block_size=16, stride=8, tau=1.0, density_limit=1.0)
    entry, _ = _routed("reference", q, k, v, policy=policy)
    assert (entry["route"], entry["path"], entry["density"]) == ("adaptive", "sparse", 1.0)
    entry, _ = _routed("reference", q, k, v, policy=hf_ahfa.AdaptivePolicy(mode="auto"))
    assert (entry["route"], entry["path"]) == ("reference", "exact") and "two blocks" in entry["reason"]
    layout = hf_ahfa.BlockLayout.from_dense(torch.ones(1, 4, 4, 4, dtype=torch.bool, device=DEVICE), 16, 16, 64, 64)
    entry, _ = _routed("reference", q, k, v, layout=layout)
    assert (entry["route"], entry["path"]) == ("layout", "sparse")


def test_policy_must_be_a_policy():
    q, k, v = _qkv(8, 8, seed=4)
    with pytest.raises(TypeError, match="policy must be a hf_ahfa.AdaptivePolicy"):
        hf_ahfa.attention(q, k, v, policy={"mode": "adaptive"})


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU routing rule (CUDA is timed, see test_gpu.py)")
def test_cpu_calls_that_sdpa_computes_exactly_run_sdpa(oracle):
    q, k, v = _qkv(9, 9, seed=7, requires_grad=True)
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, causal=True)
    assert rec[0]["route"] == "sdpa"
    want = oracle(q, k, v, causal=True)[0]
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=2e-6)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=2e-5)
    # a key padding mask with a fully padded row: zeros there, as on every backend
    kpm = torch.ones(1, 9, dtype=torch.bool)
    kpm[0, :] = False
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, key_padding_mask=kpm)
    assert rec[0]["route"] == "sdpa" and (out == 0).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU routing rule (CUDA: test_gpu.py's padded SDPA test)")
@pytest.mark.parametrize("Q,K", [(11, 11), (1, 11)])
def test_padded_causal_batches_run_sdpa_exactly(Q, K, oracle):
    """Causal with a key-padding mask (Transformers' padded batches) reaches SDPA as one boolean mask: the
    oracle's output and gradients, zeros with zero gradients where a row sees no key (left padding, a fully
    padded batch row)."""
    g = torch.Generator().manual_seed(Q + K)
    q = torch.randn(3, Q, 4, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(3, K, 2, 16, generator=g, requires_grad=True) for _ in "kv")
    kpm = torch.ones(3, K, dtype=torch.bool)
    kpm[1, :4] = False  # left padding: the first four query rows see nothing
    kpm[2] = False
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, causal=True, key_padding_mask=kpm)
    assert rec[0]["route"] == "sdpa"
    want = oracle(q, k, v, causal=True, key_padding_mask=kpm)[0]
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=2e-6)
    assert (out[2] == 0).all() and (Q == 1 or (out[1, :4] == 0).all())
    gout = torch.randn(out.shape, generator=g)
    for got, w in zip(torch.autograd.grad(out, (q, k, v), gout), torch.autograd.grad(want, (q, k, v), gout.double())):
        torch.testing.assert_close(got.double(), w.double(), atol=2e-5, rtol=2e-5)


def test_sdpa_rows_that_see_no_key_are_zeros_on_any_backend(monkeypatch, oracle):
    """Where SDPA does not zero a row that sees no key (its CUDA backends), ``_sdpa`` still gives zeros with zero
    gradients there and the oracle elsewhere. Stand-in for such a backend: the boolean mask as a -1e4 additive bias,
    so a fully masked row averages its values."""
    from hf_ahfa import router

    sdpa = F.scaled_dot_product_attention

    def bias_sdpa(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            attn_mask = torch.where(attn_mask, 0.0, -1e4).to(q.dtype)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(router.F, "scaled_dot_product_attention", bias_sdpa)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 7, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 7, 2, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    kpm = torch.ones(3, 7, dtype=torch.bool)
    kpm[1, :3] = False  # left padding: the first three query rows see nothing
    kpm[2] = False
    want = oracle(q, k, v, causal=True, key_padding_mask=kpm)[0]
    gout = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, (q, k, v), gout)
    for zeroes in (True, False):  # the stand-in breaks the result unless the rows are handled
        monkeypatch.setattr(router, "sdpa_zeroes_unseen_rows", lambda device: zeroes)
        out = hf_ahfa.attention(q, k, v, causal=True, key_padding_mask=kpm, backend="sdpa")
        grads = torch.autograd.grad(out, (q, k, v), gout)
        ok = torch.allclose(out, want, atol=1e-9) and all(torch.allclose(a, b, atol=1e-9)
                                                          for a, b in zip(grads, want_grads))
        assert ok != zeroes, f"sdpa_zeroes_unseen_rows={zeroes}: matches the oracle: {ok}"
    assert (out[2] == 0).all() and (out[1, :3] == 0).all() and (grads[0][2] == 0).all()


@pytest.mark.parametrize("kw,why", [
    (dict(softcap=2.0), "softcap"), (dict(sinks=torch.zeros(4)), "sinks"),
    (dict(dropout_p=0.5), "dropout"), (dict(return_lse=True), "log-sum-exp"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9])), "packed"),
])
def test_calls_sdpa_cannot_compute_exactly_run_our_code(kw, why):
    kw = {n: a.to(DEVICE) if isinstance(a, torch.Tensor) else a for n, a in kw.items()}
    q, k, v = _qkv(9, kw.pop("K", 9), seed=8)
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, **kw)
    assert rec[0]["route"] != "sdpa"
    with pytest.raises(ValueError, match=f"backend 'sdpa'.*{why}"):
        hf_ahfa.attention(q, k, v, backend="sdpa", **kw)


@pytest.mark.parametrize("Q,K", [(9, 12), (9, 40), (12, 9)])
def test_causal_calls_over_another_number_of_keys_reach_sdpa_as_a_mask(monkeypatch, Q, K):
    """Causality over K != Q keys (a prompt continuing a cache; more queries than keys) is aligned bottom-right and
    reaches SDPA (whose is_causal aligns top-left) as the positional mask: outputs and gradients equal the
    reference, and the CPU routes it there; above SDPA_MASK_MAX mask elements SDPA is not asked."""
    from hf_ahfa import router

    q, k, v = _qkv(Q, K, seed=Q + K, requires_grad=True)
    gout = torch.randn(q.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(3))
    results = []
    for backend in ("sdpa", "reference"):
        out = hf_ahfa.attention(q, k, v, causal=True, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), gout)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    if DEVICE == "cpu":
        assert _routed(None, q, k, v)[0]["route"] == "sdpa"
    monkeypatch.setattr(router, "SDPA_MASK_MAX", Q * K - 1)
    with pytest.raises(ValueError, match="backend 'sdpa'.*causal with K != Q"):
        hf_ahfa.attention(q, k, v, causal=True, backend="sdpa")


def test_fastest_times_once_per_key_and_defaults_while_compiling(monkeypatch):
    from hf_ahfa import fastest

    timings = {"a": 2.0, "b": 1.0}
    timed = []

    def median_ms(candidates, device):
        timed.extend(fn() for fn in candidates.values())
        return {name: timings[name] for name in candidates}

    monkeypatch.setattr(fastest, "_median_ms", median_ms)
    monkeypatch.setattr(fastest, "_times", {})
    monkeypatch.setattr(fastest, "_decided", {})
    made = []

    def candidates():
        made.append(1)
        return {"a": lambda: "a", "b": lambda: "b"}

    cpu = torch.device("cpu")
    assert fastest.fastest(("k",), candidates, default="a", device=cpu) == "b"
    timings["b"] = 3.0
    # cached: nothing timed again, and the candidates are not even built
    assert fastest.fastest(("k",), candidates, default="a", device=cpu) == "b" and len(timed) == 2 and len(made) == 1
    assert fastest.chosen() == {"k": "b"}
    # the incumbent keeps the call unless another is faster by more than the margin
    timings.update(a=1.0, b=0.96)
    assert fastest.fastest(("near",), candidates, default="b", device=cpu, incumbent="a", margin=0.05) == "a"
    timings.update(b=0.94)
    assert fastest.fastest(("far",), candidates, default="a", device=cpu, incumbent="a", margin=0.05) == "b"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fastest.fastest(("other",), candidates, default="a", device=cpu) == "a" and len(timed) == 6


def test_fastest_prefer_moves_decisions_to_the_fastest_of_the_named_candidates(monkeypatch):
    from hf_ahfa import fastest

    monkeypatch.setattr(fastest, "_times", {("w",): {"flash": 1.0, "sdpa": 3.0, "sdpa-whole": 2.0},
                                            ("p",): {"flash": 1.0, "sdpa": 0.5}, ("o",): {"flash": 1.0}})
    monkeypatch.setattr(fastest, "_decided", {("w",): "flash", ("p",): "sdpa", ("o",): "flash"})
    assert fastest.prefer(("sdpa", "sdpa-whole")) == 1
    assert fastest.chosen() == {"w": "sdpa-whole", "p": "sdpa", "o": "flash"}  # no SDPA candidate: kept


def test_fastest_times_cpu_calls_on_the_host_clock():
    """On the CPU (no device to wait for) the candidates are timed by the host's clock: a candidate 3 ms slower
    per call loses. A call as long as a batch is timed as three single calls (five runs in all, the first paid by
    a model's first call of that shape); short calls in batches of several."""
    import time

    from hf_ahfa import fastest

    runs = {"quick": 0, "slow": 0}

    def candidate(name, ms):
        return lambda: runs.__setitem__(name, runs[name] + 1) or time.sleep(ms / 1e3)

    times = fastest._median_ms({"quick": candidate("quick", 1.0), "slow": candidate("slow", 4.0)},
                               torch.device("cpu"))
    assert times["slow"] - times["quick"] > 2.0, times
    assert runs["quick"] == runs["slow"] == 5, runs  # 1 warm-up, 1 single, 3 batches of one call
    runs.update(quick=0, slow=0)
    times = fastest._median_ms({"quick": candidate("quick", 0.05), "slow": candidate("slow", 0.3)},
                               torch.device("cpu"))
    assert times["slow"] > times["quick"], times
    batched = runs["quick"] - 2  # 5 batches of as many calls as fill 2 ms (7 while a sleep takes 0.3 ms)
    assert runs["quick"] == runs["slow"] and batched % 5 == 0 and batched > 5, runs


def test_routing_leaves_torch_sdpa_settings_alone():
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    q, k, v = _qkv(9, 9, seed=9)
    hf_ahfa.attention(q, k, v, causal=True)
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()) == flags


def test_plain_transformers_calls_skip_validation_and_routing_once_routed(monkeypatch):
    """Transformers' common call (no mask, sinks, dropout, packing) routed to SDPA once runs straight
    through SDPA afterwards, with the same result bits; a decode step whose cache grew stays on the memo within
    its power of two; any change the route reads (dtype, grad, backend, recording, window) takes the full path
    again."""
    from types import SimpleNamespace

    from hf_ahfa import integration, router

    monkeypatch.setattr(router, "_plain_routes", {})
    made = []
    real_make_call = integration.make_call
    monkeypatch.setattr(integration, "make_call", lambda *a, **kw: made.append(1) or real_make_call(*a, **kw))
    module = SimpleNamespace(is_causal=True, layer_idx=0, config=None)
    fn = integration.ahfa_attention_forward
    g = torch.Generator(DEVICE).manual_seed(0)
    q = torch.randn(1, 4, 1, 16, generator=g, device=DEVICE)

    def kv(K):
        return [torch.randn(1, 2, K, 16, generator=g, device=DEVICE) for _ in "kv"]

    k, v = kv(20)
    first = fn(module, q, k, v, None, scaling=0.25)[0]
    assert len(made) == 1 and [entry[0] for entry in router._plain_routes.values()] == ["sdpa"]
    again = fn(module, q, k, v, None, scaling=0.25)[0]
    assert len(made) == 1 and torch.equal(first, again)  # the memo: no make_call, same bits
    fn(module, q, *kv(29), None, scaling=0.25)  # 29 keys: the same power of two as 20
    assert len(made) == 1
    fn(module, q, *kv(40), None, scaling=0.25)  # the next power of two: routed afresh
    assert len(made) == 2
    for change in (dict(q=q.double(), kv=[t.double() for t in (k, v)]), dict(scaling=0.5)):
        fn(module, change.get("q", q), *change.get("kv", (k, v)), None, scaling=change.get("scaling", 0.25))
    assert len(made) == 4
    monkeypatch.setenv("AHFA_BACKEND", "reference")
    fn(module, q, k, v, None, scaling=0.25)
    monkeypatch.delenv("AHFA_BACKEND")
    # a forced backend is not remembered: the memo would keep taking it once the variable is gone
    assert "reference" not in [entry[0] for entry in router._plain_routes.values()]
    with hf_ahfa.record() as rec:
        fn(module, q, k, v, None, scaling=0.25)
    assert len(made) == 6 and rec[0]["route"] == "sdpa"
    # a softcap and a window are keys of their own
    fn(module, q, k, v, None, scaling=0.25, softcap=30.0)
    fn(module, q, k, v, None, scaling=0.25, softcap=30.0)
    fn(module, q, k, v, None, scaling=0.25, sliding_window=4)
    fn(module, q, k, v, None, scaling=0.25, sliding_window=4)
    assert len(made) == 8
    fn(module, q, k, v, None, scaling=0.25, softcap=20.0)
    assert len(made) == 9
    # a sliding window as long as the cache hides no key: a plain call (a sliding layer's decode step)
    fn(module, q, k, v, None, scaling=0.25, sliding_window=20)
    assert len(made) == 9
    # an exact policy enters the key by its mode, any other by itself: a model set to auto is routed afresh once
    auto = SimpleNamespace(is_causal=True, layer_idx=0, config=SimpleNamespace(ahfa={"mode": "auto"}))
    keys = len(router._plain_routes)
    fn(auto, q, k, v, None, scaling=0.25)
    fn(auto, q, k, v, None, scaling=0.25)
    assert len(made) == 10 and len(router._plain_routes) == keys + 1
    # tensors of another rank have no key: the full path's checks name the argument
    with pytest.raises(ValueError, match="q must have shape"):
        fn(module, q[0], k[0], v[0], None, scaling=0.25)


@pytest.mark.parametrize("Q,K", [(1, 1024), (24, 24)])  # a decode step, a prompt
def test_a_remembered_transformers_call_enters_few_python_functions(monkeypatch, Q, K):
    """The memo path runs on every call of a model, where each Python call costs a host-bound decode step about
    three times its cost in a loop of its own (kernels/NOTES.md): a remembered call enters these functions of
    hf_ahfa and no others (a new helper on this path is a measured decision, not an accident)."""
    import sys

    from transformers import AutoConfig
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    from hf_ahfa import integration, router

    monkeypatch.setattr(router, "_plain_routes", {})
    monkeypatch.setattr(router, "_fastest_exact", lambda *args: "sdpa")  # (a GPU may time ours faster on a prompt)
    config = AutoConfig.for_model("qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, num_hidden_layers=1, intermediate_size=32, vocab_size=32)
    module = Qwen2Attention(config, layer_idx=0).to(DEVICE)
    q = torch.randn(1, 4, Q, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, K, 16, device=DEVICE) for _ in "kv")
    integration.ahfa_attention_forward(module, q, k, v, None, scaling=0.25)  # routed and remembered
    entered = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_globals.get("__name__", "").startswith("hf_ahfa"):
            entered.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        integration.ahfa_attention_forward(module, q, k, v, None, scaling=0.25)
    finally:
        sys.setprofile(None)
    (path, sdpa, _), = router._plain_routes.values()
    assert path == "sdpa" and sdpa is not None
    packed = Q == 1 and DEVICE in router.SDPA_PACKED_DECODE_DEVICES
    assert entered == ["ahfa_attention_forward", "_weights_requested", "eager_policy_of", "plain_key", "run_plain",
                       "recording", *(["_sdpa_call"] if packed else [])]


@pytest.mark.parametrize("Q,K,causal,window,hides", [
    (40, 40, True, 40, False), (40, 40, True, 39, True),  # a prompt no longer than the window / one key longer
    (1, 300, False, 300, False), (1, 300, False, 299, True),  # a decode step over a cache as long as the window
    (24, 30, False, (29, 23), False), (24, 30, False, (29, 22), True),  # bidirectional: both sides count
])
def test_a_window_that_hides_no_key_is_no_window(Q, K, causal, window, hides):
    """make_call drops a window that excludes no key (a sliding-window layer's decode over a cache no longer than
    the window, a prompt shorter than it): the call routes as plain attention, with the same result."""
    from hf_ahfa.spec import make_call

    q, k, v = _qkv(Q, K, seed=Q + K)
    call = make_call(q, k, v, causal=causal, window=window)
    assert (call.window is not None) == hides
    with hf_ahfa.record() as rec:
        windowed = hf_ahfa.attention(q, k, v, causal=causal, window=window)
        plain = hf_ahfa.attention(q, k, v, causal=causal)
    if hides:  # the window shows in the result, whichever route was timed faster
        assert (windowed - plain).abs().max() > 1e-4
    else:
        assert rec[0]["route"] == rec[1]["route"] and torch.equal(windowed, plain)


@pytest.mark.parametrize("chunk", [128, 4])  # 4: many chunks, some of which see no key (the last case)
@pytest.mark.parametrize("faster", ["sdpa", "sdpa-whole", "ours"])
@pytest.mark.parametrize("Q,K,causal,window,padded", [
    (37, 37, True, 9, False), (37, 37, True, 9, True),  # a sliding layer's prompt, also padded
    (1, 40, True, 8, False), (7, 30, True, 6, True),  # a decode step and a chunk over a cache (bottom-right)
    (21, 21, False, (3, 5), False), (12, 5, False, (1, 1), False),  # bidirectional; rows that see no key
])
def test_windowed_calls_run_where_they_were_timed_faster(monkeypatch, oracle, faster, Q, K, causal, window,
                                                          padded, chunk):
    """SDPA computes a sliding window's call one chunk of queries at a time, each against the keys its band
    reaches, with the chunk's part of one boolean mask, or (a short call, off the CPU) in one call over the whole
    mask; our kernels compute the window's blocks: the router times them once per shape (on every device, the CPU
    included) and runs the fastest, with the same result and gradients either way (queries bottom-right aligned,
    padding, unseen rows, chunk boundaries)."""
    from hf_ahfa import fastest, router

    monkeypatch.setattr(router, "SDPA_WINDOW_CHUNK", chunk)
    monkeypatch.setattr(router, "SDPA_WHOLE_DEVICES", frozenset({DEVICE}))

    timed = []
    monkeypatch.setattr(fastest, "_times", {})
    monkeypatch.setattr(fastest, "_decided", {})
    monkeypatch.setattr(fastest, "_median_ms", lambda cands, device: timed.append(sorted(cands)) or {
        name: (0.5 if name == faster or (faster == "ours" and not name.startswith("sdpa")) else 1.0)
        for name in cands})
    q, k, v = _qkv(Q, K, seed=Q * K, requires_grad=True)
    kpm = None
    if padded:
        kpm = torch.ones(1, K, dtype=torch.bool, device=DEVICE)
        kpm[0, :3] = False  # left padding
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, causal=causal, window=window, key_padding_mask=kpm)
    whole = Q == K  # prompts only (a decode step's whole mask would change shape every step)
    assert len(timed) == 1 and "sdpa" in timed[0] and ("sdpa-whole" in timed[0]) == whole
    assert len(timed[0]) == 2 + whole
    if faster == "sdpa-whole" and not whole:
        faster = "sdpa"  # every candidate timed alike: the incumbent keeps the call
    assert rec[0]["route"] == faster if faster != "ours" else not rec[0]["route"].startswith("sdpa"), rec[0]
    want = oracle(q, k, v, causal=causal, window=window, key_padding_mask=kpm)[0]
    gout = torch.randn_like(want)
    grads = torch.autograd.grad(out, (q, k, v), gout.to(out.dtype))
    want_grads = torch.autograd.grad(want, (q, k, v), gout)
    for name, got, w in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        err = (got.double() - w.double()).abs().max()
        assert err < 2e-5, f"{name}: {err:.3g}"


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("faster", ["sdpa", "sdpa-whole", "ours"])
@pytest.mark.parametrize("Q,K,window", [(37, 37, 9), (1, 40, 8)])  # a sliding layer's prompt and decode step
def test_windowed_transformers_calls_take_the_memo_of_their_route(monkeypatch, oracle, faster, Q, K, window, grad):
    """A sliding layer's call from Transformers, once routed, runs its route again without make_call's checks or
    the routing (``run_plain``), whichever exact path was timed faster: the same bits and gradients as the full
    path, and the oracle's values."""
    from types import SimpleNamespace

    from hf_ahfa import fastest, integration, router

    monkeypatch.setattr(router, "SDPA_WHOLE_DEVICES", frozenset({DEVICE}))
    monkeypatch.setattr(router, "_plain_routes", {})
    monkeypatch.setattr(fastest, "_times", {})
    monkeypatch.setattr(fastest, "_decided", {})
    monkeypatch.setattr(fastest, "_median_ms", lambda cands, device: {
        name: (0.5 if name == faster or (faster == "ours" and not name.startswith("sdpa")) else 1.0)
        for name in cands})
    made = []
    real_make_call = integration.make_call
    monkeypatch.setattr(integration, "make_call", lambda *a, **kw: made.append(1) or real_make_call(*a, **kw))
    module = SimpleNamespace(is_causal=True, layer_idx=0, config=None)
    q, k, v = (t.transpose(1, 2) for t in _qkv(Q, K, seed=Q + K, requires_grad=grad))  # Transformers' layout

    def call():
        return integration.ahfa_attention_forward(module, q, k, v, None, scaling=0.25, sliding_window=window)[0]

    full = call()
    ((route, *_),) = router._plain_routes.values()
    if faster == "sdpa-whole" and Q != K:
        faster = "sdpa"  # offered for prompts only
    assert route == faster if faster != "ours" else not route.startswith("sdpa"), route
    memo = call()
    assert len(made) == 1 and torch.equal(memo, full)
    want = oracle(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, window=window, scale=0.25)[0]
    torch.testing.assert_close(memo.double(), want, atol=2e-5, rtol=2e-5)
    if grad:
        gout = torch.randn_like(full)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(full, (q, k, v), gout),
                                                     torch.autograd.grad(memo, (q, k, v), gout)))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("faster", ["dense", "reference"])
@pytest.mark.parametrize("Q,K,window", [(37, 37, None), (37, 37, 9), (1, 40, None), (1, 40, 8)])
@pytest.mark.parametrize("extra", ["softcap", "sinks"])
def test_softcap_and_sink_calls_take_the_memo_of_their_route(monkeypatch, oracle, extra, faster, Q, K, window, grad):
    """A softcapped (Gemma-2) or sink (gpt-oss) layer's call from Transformers, once routed, runs its route again
    without make_call's checks or the routing: the same bits and gradients as the full path, the oracle's values;
    another layer's sinks through the same memo entry are that layer's own. On the CPU whichever of the untiled and
    tiled reference was timed faster; on CUDA our kernels (SDPA computes neither)."""
    from types import SimpleNamespace

    from hf_ahfa import fastest, integration, router

    monkeypatch.setattr(router, "_plain_routes", {})
    monkeypatch.setattr(fastest, "_times", {})
    monkeypatch.setattr(fastest, "_decided", {})
    monkeypatch.setattr(fastest, "_median_ms", lambda cands, device: {n: 0.5 if n == faster else 1.0 for n in cands})
    made = []
    real_make_call = integration.make_call
    monkeypatch.setattr(integration, "make_call", lambda *a, **kw: made.append(1) or real_make_call(*a, **kw))
    module = SimpleNamespace(is_causal=True, layer_idx=0, config=None)
    q, k, v = (t.transpose(1, 2) for t in _qkv(Q, K, seed=Q + K + 1, requires_grad=grad))  # Transformers' layout
    g = torch.Generator(DEVICE).manual_seed(3)
    sinks = [torch.randn(4, generator=g, device=DEVICE).requires_grad_(grad) for _ in range(2)]  # two layers' own
    kw = dict(softcap=20.0) if extra == "softcap" else dict(s_aux=sinks[0])

    def call(**change):
        return integration.ahfa_attention_forward(module, q, k, v, None, scaling=0.25, sliding_window=window,
                                                  **{**kw, **change})[0]

    full = call()
    ((route, *_),) = router._plain_routes.values()
    assert route == faster if DEVICE == "cpu" else route in ("flash", "decode"), route
    memo = call()
    assert len(made) == 1 and torch.equal(memo, full)
    want = oracle(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, window=window, scale=0.25,
                  softcap=kw.get("softcap"), sinks=kw.get("s_aux"))[0]
    torch.testing.assert_close(memo.double(), want, atol=2e-5, rtol=2e-5)
    inputs = (q, k, v) + ((sinks[0],) if extra == "sinks" and grad else ())
    if grad:
        gout = torch.randn_like(full)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(full, inputs, gout),
                                                     torch.autograd.grad(memo, inputs, gout)))
    if extra == "sinks":
        with hf_ahfa.record():  # (recording takes the full path)
            other_full = call(s_aux=sinks[1])
        other = call(s_aux=sinks[1])
        assert len(made) == 2 and torch.equal(other, other_full) and not torch.equal(other, memo)


@pytest.mark.parametrize("causal", [True, False])
def test_cached_band_masks_equal_their_definition(monkeypatch, causal):
    """``_band_mask`` (the positional mask of a chunk, built once per shape, additive in the queries' dtype) against
    ``positions_visible`` on every small shape and key shift: 0 exactly where visible, -inf elsewhere, and where
    some row sees no key (off the CPU) that row opened and named in ``sees``; ``sees`` is left out only where every
    row sees a key, and the mask where every key is visible to every row."""
    from hf_ahfa import router
    from hf_ahfa.masks import positions_visible

    monkeypatch.setattr(router, "sdpa_zeroes_unseen_rows", lambda device: False)  # as SDPA's CUDA backends
    router._band_mask.cache_clear()
    cpu = torch.device("cpu")
    for rows, cols, shift, window, dtype in itertools.product(range(1, 6), range(1, 7), range(-7, 4),
                                                              [None, (0, 0), (2, 0), (1, 3)],
                                                              [torch.float32, torch.float16]):
        want = positions_visible(torch.arange(rows)[:, None], torch.arange(cols) + shift, causal=causal,
                                 window=window)
        sees = want.any(-1, keepdim=True)
        mask, got_sees = router._band_mask(cpu, dtype, rows, cols, shift, causal, window, False)
        if bool(want.all()):
            assert mask is None and got_sees is None, (rows, cols, shift, window)
            continue
        assert mask.dtype == dtype and bool(((mask == 0) | (mask == float("-inf"))).all())
        if got_sees is None:
            assert sees.all() and torch.equal(mask == 0, want), (rows, cols, shift, window)
        else:
            assert torch.equal(got_sees, sees) and torch.equal(mask == 0, want | ~sees), (rows, cols, shift, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cached_additive_band_masks_give_sdpa_the_bits_of_its_boolean_masks(dtype):
    """SDPA over a cached additive band mask returns the bits it returns over the boolean mask (which it turns
    into the same additive mask on every call), outputs and gradients."""
    from hf_ahfa import router
    from hf_ahfa.masks import positions_visible

    g = torch.Generator(DEVICE).manual_seed(7)
    q = torch.randn(1, 4, 45, 16, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
    k, v = (torch.randn(1, 2, 45, 16, device=DEVICE, dtype=dtype, generator=g).requires_grad_() for _ in "kv")
    mask, sees = router._band_mask(q.device, dtype, 45, 45, 0, True, (9, 0), False)
    boolean = positions_visible(torch.arange(45, device=DEVICE)[:, None], torch.arange(45, device=DEVICE),
                                causal=True, window=(9, 0))
    assert sees is None
    gout = torch.randn(1, 4, 45, 16, device=DEVICE, dtype=dtype, generator=g)
    outs = []
    for m in (mask, boolean):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        outs.append((out, *torch.autograd.grad(out, (q, k, v), gout)))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_windowed_decode_step_through_sdpa_passes_no_mask(monkeypatch):
    """A decode step over a window's keys hides nothing, so SDPA gets no mask (its unmasked kernels may run), while a
    prompt's chunks keep their bands; both equal the reference."""
    from hf_ahfa import router

    masks = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(router.F, "scaled_dot_product_attention",
                        lambda *a, **kw: masks.append((kw["attn_mask"], kw["is_causal"])) or sdpa(*a, **kw))
    router._band_mask.cache_clear()
    for Q in (1, 9):
        q, k, v = _qkv(Q, 40, seed=Q)
        masks.clear()
        out = hf_ahfa.attention(q, k, v, causal=True, window=5, backend="sdpa")
        want = hf_ahfa.attention(q, k, v, causal=True, window=5, backend="reference")
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
        if Q == 1:
            assert masks == [(None, False)]
        else:
            assert masks and all(m is not None and not causal for m, causal in masks)


def test_windowed_sdpa_builds_each_band_once_and_keeps_modes_apart(monkeypatch):
    """A windowed call through SDPA builds its chunks' band masks on its shape's first call only (every later layer
    and call reuses them), none while torch.compile traces, and the masks made under inference mode are not reused
    by a call that autograd records (which would fail to save them for the backward)."""
    from hf_ahfa import router

    built = []
    visible = router.positions_visible
    monkeypatch.setattr(router, "positions_visible", lambda *a, **kw: built.append(1) or visible(*a, **kw))
    monkeypatch.setattr(router, "SDPA_WINDOW_CHUNK", 4)
    router._band_mask.cache_clear()
    q, k, v = _qkv(37, 37, seed=11, requires_grad=True)
    with torch.inference_mode():
        hf_ahfa.attention(q.detach(), k.detach(), v.detach(), causal=True, window=5, backend="sdpa")
    first, chunks = len(built), -(-37 // 6)  # chunks of 6 queries (the band is 6 keys wide)
    assert 0 < first < chunks  # the masks of the first, inner and last chunks
    hf_ahfa.attention(q, k, v, causal=True, window=5, backend="sdpa").sum().backward()
    assert len(built) == 2 * first and q.grad is not None
    out = hf_ahfa.attention(q, k, v, causal=True, window=5, backend="sdpa")
    assert len(built) == 2 * first  # nothing built again
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(hf_ahfa.attention(q, k, v, causal=True, window=5, backend="sdpa"), out)
    assert len(built) >= 2 * first + chunks  # while tracing: built per chunk, not cached


def test_whole_windowed_sdpa_is_a_candidate_for_short_calls_off_the_cpu(monkeypatch):
    """"sdpa-whole" (a windowed prompt as one SDPA call over its whole mask) is timed only on SDPA_WHOLE_DEVICES
    (not the CPU, where the chunks' smaller work wins), only up to SDPA_WINDOW_WHOLE_MAX mask elements, and not for
    calls over a cache (Q < K)."""
    from hf_ahfa import fastest, router

    timed = []
    monkeypatch.setattr(fastest, "_median_ms", lambda cands, device: timed.append(sorted(cands)) or {
        name: 1.0 for name in cands})
    q, k, v = _qkv(30, 30, seed=4)
    for devices, limit, offered in ((router.SDPA_WHOLE_DEVICES, 900, DEVICE != "cpu"), ({DEVICE}, 900, True),
                                    ({DEVICE}, 899, False)):
        monkeypatch.setattr(fastest, "_times", {})
        monkeypatch.setattr(fastest, "_decided", {})
        monkeypatch.setattr(router, "SDPA_WHOLE_DEVICES", frozenset(devices))
        monkeypatch.setattr(router, "SDPA_WINDOW_WHOLE_MAX", limit)
        hf_ahfa.attention(q, k, v, causal=True, window=5)
        assert ("sdpa-whole" in timed[-1]) == offered and "sdpa" in timed[-1], (devices, limit, timed[-1])
    hf_ahfa.attention(q[:, -3:], k, v, causal=True, window=5)  # three queries over the cache: not offered
    assert "sdpa-whole" not in timed[-1] and "sdpa" in timed[-1], timed[-1]


def test_a_window_too_large_for_one_mask_never_reaches_sdpa(monkeypatch):
    """A window reaches SDPA as one dense mask per chunk of queries (times the batch with padding): above
    SDPA_MASK_MAX elements the call is not offered to SDPA at all (never timed) and backend='sdpa' names the
    reason."""
    from hf_ahfa import fastest, router

    monkeypatch.setattr(router, "SDPA_MASK_MAX", 30 * 30 - 1)
    monkeypatch.setattr(fastest, "_times", {})
    q, k, v = _qkv(30, 30, seed=3)
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, causal=True, window=5)
    assert rec[0]["route"] != "sdpa" and not any("sdpa" in times for times in fastest._times.values())
    with pytest.raises(ValueError, match="backend 'sdpa'.*sliding window: SDPA would need a dense mask"):
        hf_ahfa.attention(q, k, v, causal=True, window=5, backend="sdpa")


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_masked_gqa_through_sdpa_repeats_the_key_value_heads(monkeypatch, kv_heads):
    """Where SDPA would run a masked GQA call on its math backend (CUDA), the masked calls get the key/value heads
    repeated instead of ``enable_gqa`` (a stride-0 view for one key/value head); unmasked calls keep SDPA's own
    broadcast. The same outputs and gradients either way (float64: the two differ only in rounding)."""
    from hf_ahfa import router

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((kw["attn_mask"] is not None, kw.get("enable_gqa", False), k.shape[1], k.stride(1)))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(router.F, "scaled_dot_product_attention", spy)
    g = torch.Generator(DEVICE).manual_seed(kv_heads)
    q = torch.randn(2, 29, 4, 16, device=DEVICE, dtype=torch.float64, generator=g).requires_grad_()
    k, v = (torch.randn(2, 29, kv_heads, 16, device=DEVICE, dtype=torch.float64, generator=g).requires_grad_()
            for _ in "kv")
    padding = torch.ones(2, 29, dtype=torch.bool, device=DEVICE)
    padding[1, :5] = False
    results = {}
    for devices in (frozenset(), frozenset({DEVICE})):
        monkeypatch.setattr(router, "SDPA_MASKED_GQA_REPEAT_DEVICES", devices)
        calls.clear()
        out = hf_ahfa.attention(q, k, v, causal=True, window=6, key_padding_mask=padding, backend="sdpa")
        plain = hf_ahfa.attention(q, k, v, causal=True, backend="sdpa")
        results[devices] = (out, plain, *torch.autograd.grad((out.sum(), plain.sum()), (q, k, v)))
        masked = [c for c in calls if c[0]]
        assert masked and all(c[2] == (kv_heads if not devices else 4) for c in masked)
        assert all(c[1] == (not devices) for c in masked)
        if devices and kv_heads == 1:
            assert all(c[3] == 0 for c in masked)  # a view, no copy
        assert all(c[1] and c[2] == kv_heads for c in calls if not c[0])  # unmasked: SDPA's own broadcast
    for a, b in zip(*results.values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padded", [False, True])
def test_gqa_decode_steps_reach_sdpa_packed_where_that_is_faster(monkeypatch, oracle, padded):
    """A decode step (one query per head) of a GQA call reaches SDPA on SDPA_PACKED_DECODE_DEVICES as each
    key/value head's query heads stacked as its rows (one read of each cache), through the full route and
    Transformers' memo alike; outputs and gradients equal the oracle and the enable_gqa form."""
    from types import SimpleNamespace

    from hf_ahfa import integration, router

    shapes = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        shapes.append((tuple(q.shape), kw.get("enable_gqa", False)))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(router.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(router, "_plain_routes", {})
    g = torch.Generator(DEVICE).manual_seed(3)
    q = torch.randn(2, 1, 6, 16, device=DEVICE, dtype=torch.float64, generator=g).requires_grad_()
    k, v = (torch.randn(2, 37, 2, 16, device=DEVICE, dtype=torch.float64, generator=g).requires_grad_()
            for _ in "kv")
    padding = None
    if padded:
        padding = torch.ones(2, 37, dtype=torch.bool, device=DEVICE)
        padding[1, :9] = False
    want = oracle(q, k, v, key_padding_mask=padding)[0]
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    results = {}
    for devices in (frozenset({DEVICE}), frozenset()):
        monkeypatch.setattr(router, "SDPA_PACKED_DECODE_DEVICES", devices)
        shapes.clear()
        out = hf_ahfa.attention(q, k, v, key_padding_mask=padding, backend="sdpa")
        results[devices] = (out, *torch.autograd.grad(out.sum(), (q, k, v)))
        # (masked GQA calls get their heads repeated where SDPA would run them on its math backend: CUDA)
        unpacked = ((2, 6, 1, 16), not (padded and DEVICE in router.SDPA_MASKED_GQA_REPEAT_DEVICES))
        # (on CUDA the route is timed first: each candidate's runs reach SDPA in the same form)
        assert shapes and set(shapes) == {((2, 2, 3, 16), False) if devices else unpacked}
    for got in results.values():
        torch.testing.assert_close(got[0], want, rtol=1e-12, atol=1e-12)
        for a, b in zip(got[1:], want_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if padded:
        return
    # Transformers' layout, the second call through the memo of plain calls
    monkeypatch.setattr(router, "SDPA_PACKED_DECODE_DEVICES", frozenset({DEVICE}))
    module = SimpleNamespace(is_causal=True, layer_idx=0, config=None)
    heads_first = [t.detach().transpose(1, 2) for t in (q, k, v)]
    for _ in range(2):
        shapes.clear()
        out = integration.ahfa_attention_forward(module, *heads_first, None)[0]
        assert shapes and set(shapes) == {((2, 2, 3, 16), False)}
        torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-12)


def test_the_untiled_route_is_offered_within_its_bounds():
    """``_dense_fits``: the untiled route is timed beside the tiled reference only, for calls of at most
    DENSE_MAX_SCORES scores without lse, dropout or packing."""
    from hf_ahfa.router import DENSE_MAX_SCORES, _dense_fits
    from hf_ahfa.spec import make_call

    q, k, v = torch.randn(2, 1, 8, 16, requires_grad=True), torch.randn(2, 300, 2, 16), torch.randn(2, 300, 2, 16)
    call = make_call(q, k, v, causal=True, softcap=30.0)
    assert _dense_fits(q, k, call, "reference", need_lse=False)
    assert not _dense_fits(q, k, call, "reference", need_lse=True)
    assert not any(_dense_fits(q, k, call, path, need_lse=False) for path in ("decode", "flash"))
    qd = q.detach()
    assert not _dense_fits(qd, k, make_call(qd, k, v, dropout_p=0.1), "reference", need_lse=False)
    big = torch.empty(1, DENSE_MAX_SCORES // (8 * 300) + 1, 8, 16)
    assert not _dense_fits(big, k[:1], make_call(big, k[:1], v[:1]), "reference", need_lse=False)
