"""GPU tests (``pytest -m gpu`` on the accelerator machine): real sizes, bf16, compile, models.

Error yardstick: the kernel's bf16 error against a float32 reference must stay within twice the error
of plain PyTorch attention computed in bf16 (matmuls in bf16, softmax in float32) on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

import hf_ahfa

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


def _eager_bf16(q, k, v, causal=False, window=None, softcap=None, sinks=None, alibi_slopes=None, **_):
    """PyTorch attention in bf16: the precision a user gets without ahfa (expands GQA, builds the mask)."""
    from hf_ahfa.masks import make_layout, normalize_window, visible

    B, Q, H, D = q.shape
    K, G = k.shape[1], H // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(G, 1), v.transpose(1, 2).repeat_interleave(G, 1)
    s = (qt @ kt.transpose(-1, -2)).float() * D**-0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        pos = torch.arange(Q, device=q.device)[:, None] + (K - Q)
        s = s - alibi_slopes.view(1, H, 1, 1) * (pos - torch.arange(K, device=q.device)[None, :]).abs()
    ok = visible(make_layout(Q, K, q.device), slice(None), slice(None), causal=causal,
                 window=normalize_window(window, causal))
    s = s.masked_fill(~ok, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.float().view(1, H, 1, 1).expand(B, H, Q, 1)], -1)
    p = torch.softmax(s, -1)[..., :K]
    return (p.to(q.dtype) @ vt).transpose(1, 2)


CASES = [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, window=512),
    dict(causal=True, softcap=30.0),
    dict(causal=True, sinks=True),
    dict(causal=True, alibi=True),
    dict(causal=False, alibi=True),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("D", [64, 80, 128, 256])
def test_bf16_forward_backward_real_sizes(kw, D):
    torch.manual_seed(D)
    B, T, H, HKV = 2, 2048 if D <= 128 else 1024, 16, 4
    q = torch.randn(B, T, H, D, device="cuda", dtype=BF16)
    k, v = (torch.randn(B, T, HKV, D, device="cuda", dtype=BF16) for _ in range(2))
    kw = dict(kw)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(H, device="cuda")
    if kw.pop("alibi", False):  # the ALiBi paper's slopes for 16 heads
        kw["alibi_slopes"] = 2.0 ** (-0.5 * torch.arange(1, H + 1, device="cuda"))
    gout = torch.randn(B, T, H, D, device="cuda", dtype=BF16)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, **kw)
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, leaves, gout.to(dtype)))]

    ref = run(lambda *a, **k: hf_ahfa.attention(*a, **k, backend="reference"), torch.float32)
    ours = run(lambda *a, **k: hf_ahfa.attention(*a, **k, backend="triton"), BF16)
    theirs = run(_eager_bf16, BF16)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        err, yard = (a - r).abs().max().item(), (b - r).abs().max().item()
        assert err <= 2 * yard + 1e-3, f"{name}: ahfa bf16 error {err:.3e} vs PyTorch bf16 error {yard:.3e}"


def test_varlen_and_padding_bf16():
    torch.manual_seed(0)
    cu = torch.tensor([0, 100, 1100, 1101, 3000], device="cuda")
    q = torch.randn(1, 3000, 8, 128, device="cuda", dtype=BF16)
    k, v = (torch.randn(1, 3000, 2, 128, device="cuda", dtype=BF16) for _ in range(2))
    out = hf_ahfa.attention(q, k, v, causal=True, cu_seqlens=cu, backend="triton")
    ref = hf_ahfa.attention(q.float(), k.float(), v.float(), causal=True, cu_seqlens=cu, backend="reference")
    assert (out.float() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("K", [4096, 131072])
def test_decode_split_kv(K):
    torch.manual_seed(K)
    q = torch.randn(8, 1, 32, 128, device="cuda", dtype=BF16)
    k, v = (torch.randn(8, K, 8, 128, device="cuda", dtype=BF16) for _ in range(2))
    out = hf_ahfa.attention(q, k, v, causal=True, backend="triton")
    # one batch row at a time: float32 SDPA with the KV heads expanded to 32 held ~60 GB at K=131072 for all 8
    # rows and ran parallel GPU test workers out of memory (2026-12-05)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[i:i + 1].transpose(1, 2).float(), k[i:i + 1].transpose(1, 2).float(), v[i:i + 1].transpose(1, 2).float(),
        enable_gqa=True).transpose(1, 2) for i in range(q.shape[0])])
    assert (out.float() - ref).abs().max() < 1e-2


def test_decode_split_kv_alibi():
    torch.manual_seed(1)
    q = torch.randn(4, 2, 32, 128, device="cuda", dtype=BF16)
    k, v = (torch.randn(4, 8192, 8, 128, device="cuda", dtype=BF16) for _ in range(2))
    slopes = torch.rand(4, 32, device="cuda") * 0.05
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, causal=True, alibi_slopes=slopes, backend="triton")
    assert rec[0]["route"] == "decode"
    ref = hf_ahfa.attention(*(t.float() for t in (q, k, v)), causal=True, alibi_slopes=slopes, backend="reference")
    assert (out.float() - ref).abs().max() < 1e-2


@pytest.mark.parametrize("D,G,Q", [(256, 7, 15), (256, 8, 16), (128, 8, 16)])
def test_decode_wide_groups_fit(D, G, Q):
    """A GQA group x queries of up to 128 rows at head dim 256: the first decode config does not fit the
    shared memory, the next one that does runs (GPU fuzz configuration 110 raised OutOfResources)."""
    torch.manual_seed(D + G)
    q = torch.randn(3, Q, G, D, device="cuda", dtype=BF16)
    k, v = (torch.randn(3, 792, 1, D, device="cuda", dtype=BF16) for _ in range(2))
    with hf_ahfa.record() as rec:
        out = hf_ahfa.attention(q, k, v, causal=True, backend="triton")
    assert rec[0]["route"] == "decode"
    ref = hf_ahfa.attention(q.float(), k.float(), v.float(), causal=True, backend="reference")
    assert (out.float() - ref).abs().max() < 2e-2


def test_opcheck_cuda():
    from hf_ahfa.kernels.flash import flash_fwd

    q = torch.randn(2, 200, 4, 64, device="cuda", dtype=BF16, requires_grad=True)
    k, v = (torch.randn(2, 200, 2, 64, device="cuda", dtype=BF16, requires_grad=True) for _ in range(2))
    torch.library.opcheck(flash_fwd, (q, k, v, None, None, None, None, None, 200, 200, True, -1, -1, 0.0, 0.0, 0, 0.125))


def test_fullgraph_compile_matches_eager():
    q = torch.randn(2, 300, 8, 64, device="cuda", dtype=BF16, requires_grad=True)
    k, v = (torch.randn(2, 300, 2, 64, device="cuda", dtype=BF16, requires_grad=True) for _ in range(2))

    def f(q, k, v):
        return hf_ahfa.attention(q, k, v, causal=True, window=100, backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    a, b = f(q, k, v), compiled(q, k, v)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    gb = torch.autograd.grad(b.sum(), (q, k, v))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def _tiny(model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **common, **extra)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to("cuda", BF16).eval()


FAMILIES = {
    "llama": {},
    "qwen3": {},
    "mistral": dict(sliding_window=128),
    "gemma2": dict(sliding_window=128, attn_logit_softcapping=50.0, query_pre_attn_scalar=64),
    "gemma3_text": dict(sliding_window=128),
    "gpt_oss": dict(sliding_window=128, num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_family_logits_bf16(family):
    model = _tiny(family, **FAMILIES[family])
    ids = torch.randint(0, 512, (2, 700), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :37] = 0  # left padding
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model.float()(ids, attention_mask=mask).logits
        model.to(BF16)
        base = model(ids, attention_mask=mask).logits.float()
        model.set_attn_implementation("ahfa")
        ours = model(ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    err, yard = (ours - ref)[keep].abs().max().item(), (base - ref)[keep].abs().max().item()
    assert err <= 2 * yard + 1e-2, f"{family}: ahfa bf16 logit error {err:.3e} vs eager bf16 {yard:.3e}"


PATCHED = {  # hf_ahfa.patches families (issue 14): their own attention code rerouted through ahfa
    "gpt_neo": dict(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=512, window_size=128,
                    attention_types=[[["global", "local"], 2]], max_position_embeddings=4096, bos_token_id=0,
                    eos_token_id=0),
    "bloom": dict(hidden_size=256, n_layer=4, n_head=8),
    "mpt": dict(d_model=256, n_layers=4, n_heads=8, expansion_ratio=2, max_seq_len=4096),
}


@pytest.mark.parametrize("family", list(PATCHED))
def test_patched_family_logits_bf16_on_our_kernels(family):
    """The patched families on the GPU kernels (ALiBi, GPT-Neo's local layers) within twice eager-bf16's
    logit error against eager float32, left-padded batch of 700 tokens."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, vocab_size=512, **PATCHED[family])
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").to("cuda").eval()
    ahfa = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="ahfa").to("cuda", BF16).eval()
    ahfa.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 512, (2, 700), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask).logits
        base = eager.to(BF16)(ids, attention_mask=mask).logits.float()
        with hf_ahfa.record() as rec:
            ours = ahfa(ids, attention_mask=mask).logits.float()
    assert len(rec) == 4 and all(r["backend"] == "triton" for r in rec if family != "gpt_neo"), rec
    keep = mask.bool()
    err, yard = (ours - ref)[keep].abs().max().item(), (base - ref)[keep].abs().max().item()
    assert err <= 2 * yard + 1e-2, f"{family}: ahfa bf16 logit error {err:.3e} vs eager bf16 {yard:.3e}"


def test_fullgraph_compile_of_a_routed_call():
    # the router's first choice for a shape is made inside the trace (no backend requested): it once imported
    # flash-attn's modules there, which Dynamo refuses (hf_ahfa.installed.candidates)
    from hf_ahfa import installed

    installed.modules.cache_clear()
    torch._dynamo.reset()
    torch.manual_seed(5)
    q = torch.randn(2, 300, 8, 64, device="cuda", dtype=BF16)
    k, v = (torch.randn(2, 300, 2, 64, device="cuda", dtype=BF16) for _ in range(2))
    gout = torch.randn_like(q)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, leaves, gout.to(dtype)))]

    ref = run(lambda *a: hf_ahfa.attention(*a, causal=True, backend="reference"), torch.float32)
    ours = run(torch.compile(lambda *a: hf_ahfa.attention(*a, causal=True), fullgraph=True), BF16)
    theirs = run(lambda *a: _eager_bf16(*a, causal=True), BF16)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        err, yard = (a - r).abs().max().item(), (b - r).abs().max().item()
        assert err <= 2 * yard + 1e-3, f"{name}: compiled routed error {err:.3e} vs PyTorch bf16 error {yard:.3e}"


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_no_host_synchronisation_per_call(padded):
    """Issue 11: once a shape is routed (its first calls may time candidates, which waits), attention calls never
    wait for the GPU. Inside a model (prefill and decode steps with a dynamic cache; the model's mask preparation,
    which waits as sdpa's does, is outside the attention function) and a training call's forward and backward,
    under ``torch.cuda.set_sync_debug_mode("error")``, which raises on a synchronising CUDA call."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from hf_ahfa.integration import ahfa_attention_forward, ahfa_mask

    checking = []

    def checked(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error" if checking else "default")
        try:
            return ahfa_attention_forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    AttentionInterface.register("ahfa-sync-checked", checked)
    AttentionMaskInterface.register("ahfa-sync-checked", ahfa_mask)
    model = _tiny("qwen2")
    model.set_attn_implementation("ahfa-sync-checked")
    ids = torch.randint(0, 512, (2, 600), device="cuda")
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :37] = 0
    q = torch.randn(2, 600, 8, 64, device="cuda", dtype=BF16, requires_grad=True)
    k, v = (torch.randn(2, 600, 2, 64, device="cuda", dtype=BF16, requires_grad=True) for _ in range(2))

    def run():
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True)
            cache, step_mask = out.past_key_values, mask
            for _ in range(3):
                step_mask = torch.cat([step_mask, step_mask.new_ones(2, 1)], dim=1)
                out = model(ids[:, -1:], attention_mask=step_mask, past_key_values=cache, use_cache=True)
        torch.cuda.set_sync_debug_mode("error" if checking else "default")
        try:
            out = hf_ahfa.attention(q, k, v, causal=True, key_padding_mask=mask.bool() if padded else None)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")

    run()  # routes and tunes every shape
    torch.cuda.synchronize()
    checking.append(True)
    run()


def test_compiled_static_cache_generate():
    model = _tiny("llama")
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 512, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kw = dict(max_new_tokens=16, do_sample=False, cache_implementation="static", attention_mask=mask)
    model.set_attn_implementation("ahfa")
    ours = model.generate(ids, **kw, return_dict_in_generate=True, output_logits=True)
    model.set_attn_implementation("sdpa")
    base = model.generate(ids, **kw, return_dict_in_generate=True, output_logits=True)
    step0 = (ours.logits[0].float() - base.logits[0].float()).abs().max().item()
    assert step0 < 0.1, f"first decode logits differ by {step0}"
    agree = (ours.sequences == base.sequences).float().mean().item()
    assert agree > 0.9, f"only {agree:.0%} of greedy tokens agree with sdpa"


# ---- block-sparse and adaptive paths at real sizes


def _random_layout(B, H, T, density, seed):
    from hf_ahfa.eval.speed import random_layout

    return random_layout(B, H, T, density, True, "cuda", seed=seed)


@pytest.mark.parametrize("D", [64, 128, 256])
def test_block_sparse_bf16_real_sizes(D):
    # yardstick: the dense bf16 kernel's own error against float32; the sparse one may not be worse
    torch.manual_seed(D)
    B, T, H, HKV = 1, 4096 if D <= 128 else 2048, 16, 4
    q = torch.randn(B, T, H, D, device="cuda", dtype=BF16)
    k, v = (torch.randn(B, T, HKV, D, device="cuda", dtype=BF16) for _ in range(2))
    gout = torch.randn(B, T, H, D, device="cuda", dtype=BF16)
    layout = _random_layout(B, H, T, 0.3, seed=D)

    def run(dtype, backend, **kw):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = hf_ahfa.attention(*leaves, causal=True, backend=backend, **kw)
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, leaves, gout.to(dtype)))]

    sparse = run(BF16, "triton", layout=layout)
    sparse_ref = run(torch.float32, "reference", layout=layout)
    dense, dense_ref = run(BF16, "triton"), run(torch.float32, "reference")
    for name, a, r, b, rb in zip(("out", "dq", "dk", "dv"), sparse, sparse_ref, dense, dense_ref):
        err, yard = (a - r).abs().max().item(), (b - rb).abs().max().item()
        assert err <= 2 * yard + 1e-3, f"{name}: sparse bf16 error {err:.3e} vs dense bf16 error {yard:.3e}"


def test_estimator_bf16_matches_reference():
    from hf_ahfa.estimate import estimate_mass_reference, sample_queries
    from hf_ahfa.kernels.estimate import estimate_mass

    torch.manual_seed(1)
    T, H, HKV, D = 8192, 8, 2, 128
    q = torch.randn(1, T, H, D, device="cuda", dtype=BF16) * 2
    k = torch.randn(1, T, HKV, D, device="cuda", dtype=BF16)
    qs = sample_queries(q, 16)
    got = estimate_mass(qs, k, None, T, 16, 128, True, -1, -1, 0.0, D**-0.5)
    want = estimate_mass_reference(qs, k, None, T, 16, 128, True, None, None, D**-0.5)
    assert (got - want).abs().max() < 2e-3


def test_adaptive_tau_one_equals_exact_bf16():
    torch.manual_seed(2)
    q = torch.randn(1, 8192, 16, 64, device="cuda", dtype=BF16)
    k, v = (torch.randn(1, 8192, 4, 64, device="cuda", dtype=BF16) for _ in range(2))
    policy = hf_ahfa.AdaptivePolicy(mode="adaptive", tau=1.0, density_limit=1.0)
    with hf_ahfa.record() as rec:
        sparse = hf_ahfa.attention(q, k, v, causal=True, policy=policy).float()
    exact = hf_ahfa.attention(q, k, v, causal=True).float()
    assert rec[0]["path"] == "sparse" and rec[0]["density"] == 1.0
    assert (sparse - exact).abs().max() < 1e-2


def test_adaptive_cuda_graph_replay_matches_eager():
    from hf_ahfa import graphs

    policy = hf_ahfa.AdaptivePolicy(mode="adaptive", tau=0.9)
    outs = {}
    for enabled in (False, True):
        graphs.ENABLED = enabled
        try:
            for seed in (0, 1):  # a second input through the same graph: its buffers are refreshed
                torch.manual_seed(seed)
                q = torch.randn(1, 4096, 8, 64, device="cuda", dtype=BF16) * 2
                k, v = (torch.randn(1, 4096, 2, 64, device="cuda", dtype=BF16) for _ in range(2))
                outs[enabled, seed] = hf_ahfa.attention(q, k, v, causal=True, policy=policy)
        finally:
            graphs.ENABLED = True
    for seed in (0, 1):
        assert torch.equal(outs[False, seed], outs[True, seed])
    assert not torch.equal(outs[True, 0], outs[True, 1])


def test_auto_mode_is_timed_once_per_shape_and_gives_either_result(monkeypatch):
    """mode="auto" on the GPU: the block-sparse call (estimator, selection and kernels, replayed as a CUDA graph)
    and the exact route are timed once for the shape; the call gives the adaptive mode's result where that won,
    exact attention's otherwise, and the timing runs leave no entries in record()."""
    from hf_ahfa import fastest, graphs

    monkeypatch.setattr(fastest, "_times", {})
    monkeypatch.setattr(fastest, "_decided", {})
    torch.manual_seed(0)
    q = torch.randn(1, 4096, 8, 64, device="cuda", dtype=BF16) * 2
    k, v = (torch.randn(1, 4096, 2, 64, device="cuda", dtype=BF16) for _ in range(2))
    auto = hf_ahfa.AdaptivePolicy(mode="auto", tau=0.9, min_length=1024)
    sparse = hf_ahfa.attention(q, k, v, causal=True, policy=hf_ahfa.AdaptivePolicy(mode="adaptive", tau=0.9))
    exact = hf_ahfa.attention(q, k, v, causal=True)
    for _ in range(2):
        with hf_ahfa.record() as rec:
            out = hf_ahfa.attention(q, k, v, causal=True, policy=auto)
        assert len(rec) == 1
        assert torch.equal(out, sparse if rec[0]["route"] == "adaptive" else exact)
    times = [t for key, t in fastest._times.items() if key[0] == "auto"]
    print(f"auto at 4K, GQA 8/2, D 64, tau 0.9 (ms): {times}; ran {rec[0]['route']}")
    assert len(times) == 1 and set(times[0]) == {"exact", "adaptive"}
    for enabled in (False, True):  # the graphed selection is the eager one
        graphs.ENABLED = enabled
        try:
            out = hf_ahfa.attention(q, k, v, causal=True, policy=hf_ahfa.AdaptivePolicy(mode="adaptive", tau=0.9))
            assert torch.equal(out, sparse)
        finally:
            graphs.ENABLED = True


@pytest.mark.parametrize("Q,K,Hkv,grad", [(4096, 4096, 32, False), (4096, 4096, 8, True), (1, 32768, 8, False)])
def test_routed_calls_match_own_kernels(Q, K, Hkv, grad):
    """The router's choice (SDPA where it computes the call exactly and was timed faster) gives our kernels'
    result up to bf16 rounding, and record() names it."""
    torch.manual_seed(Q + Hkv)
    q = torch.randn(2, Q, 32, 128, device="cuda", dtype=BF16, requires_grad=grad)
    k, v = (torch.randn(2, K, Hkv, 128, device="cuda", dtype=BF16, requires_grad=grad) for _ in range(2))
    with hf_ahfa.record() as rec:
        routed = hf_ahfa.attention(q, k, v, causal=True)
    own = hf_ahfa.attention(q, k, v, causal=True, backend="triton")
    assert rec[0]["route"] in ("sdpa", "flash", "decode")
    print(f"route Q={Q} K={K} Hkv={Hkv} grad={grad}: {rec[0]['route']}")
    assert (routed.float() - own.float()).abs().max() < 2e-2
    if grad:
        g = torch.randn_like(routed)
        for a, b in zip(torch.autograd.grad(routed, (q, k, v), g), torch.autograd.grad(own, (q, k, v), g)):
            assert (a.float() - b.float()).abs().max() / b.float().abs().max() < 2e-2


def _launch_configs():
    from hf_ahfa.kernels import configs

    if not torch.cuda.is_available():
        return []
    arch = configs.arch(torch.device("cuda"))
    # the forward's entries with each load mode (AHFA_TMA "1" / "0"), the backward's with the default
    return [(name, D, cfg, tma) for name in ("FWD", "BWD") for D in (64, 128, 256)
            for cfg in getattr(configs, name)[arch][configs.bucket(D)]
            for tma in (("1", "0") if name == "FWD" else ("auto",))]


# the ALiBi bias in either form (AHFA_ALIBI; bidirectional calls have the distance form only)
@pytest.mark.parametrize("causal,alibi", [(True, False), (True, "distance"), (True, "keys"), (True, "fwd-keys"),
                                          (False, False), (False, "distance")])
@pytest.mark.parametrize("table,D,cfg,tma", _launch_configs())
def test_every_launch_config_is_right(monkeypatch, table, D, cfg, tma, causal, alibi):
    # the autotuner may pick any entry of a table (and either load mode of the forward): each one pinned in turn
    # must give the right output and gradients (triton 3.6 compiled some backward entries to wrong dk on the H200;
    # the fuzz runs the first entry only). The shapes of the run that found it (scripts/launch_config_check.py).
    from hf_ahfa.kernels import common, configs, tuning

    monkeypatch.setitem(getattr(configs, table)[configs.arch(torch.device("cuda"))], configs.bucket(D), [cfg])
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(common, "TMA", tma)
    if alibi:
        monkeypatch.setattr(common, "ALIBI_FORM", alibi)
    g = torch.Generator(device="cuda").manual_seed(D)
    B, T, H = 4, 4096, 16
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=g).to(BF16).requires_grad_() for _ in "qkv")
    slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda") if alibi else None
    try:
        out = hf_ahfa.attention(q, k, v, causal=causal, backend="triton", alibi_slopes=slopes)
    except RuntimeError as err:  # TMA's staging needs more shared memory: such an entry runs with pointer loads
        if tma == "1" and "no launch configuration" in str(err):
            pytest.skip(f"{cfg} does not fit with TMA loads at D={D}")
        raise
    gout = torch.randn(out.shape, device="cuda", generator=g).to(BF16)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    leaves = [t[:1].detach().float().requires_grad_() for t in (q, k, v)]  # the first batch row in float32
    ref = hf_ahfa.attention(*leaves, causal=causal, backend="reference", alibi_slopes=slopes)
    want = (ref, *torch.autograd.grad(ref, leaves, gout[:1].float()))
    for name, got, w in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        err = ((got[:1].float() - w).abs().max() / w.abs().max()).item()
        assert err < 0.01, f"{name}: relative error {err:.3g} with {table} launch config {cfg}"  # right: ~0.004


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=True, window=200, softcap=30.0), dict(causal=False)],
                         ids=["causal", "window-softcap", "full"])
def test_float32_launch_configs_are_right(D, kw):
    # float32 has its own tiles (kernels/configs.py FWD_FLOAT32 / BWD_FLOAT32: the 16-bit ones compiled for minutes)
    g = torch.Generator(device="cuda").manual_seed(D)
    q, k, v = (torch.randn(2, 1000, h, D, device="cuda", generator=g).requires_grad_() for h in (8, 2, 2))
    out = hf_ahfa.attention(q, k, v, backend="triton", **kw)
    gout = torch.randn(out.shape, device="cuda", generator=g)
    got = (out, *torch.autograd.grad(out, (q, k, v), gout))
    ref = hf_ahfa.attention(q, k, v, backend="reference", **kw)
    want = (ref, *torch.autograd.grad(ref, (q, k, v), gout))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-4, f"{name}: relative error {err:.3g} at D={D}"


def test_exact_decode_goes_to_sdpa_untimed(monkeypatch):
    from hf_ahfa import fastest

    monkeypatch.setattr(fastest, "_times", {})
    q = torch.randn(2, 1, 8, 64, device="cuda", dtype=BF16)
    k, v = (torch.randn(2, 4096, 2, 64, device="cuda", dtype=BF16) for _ in "kv")
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, causal=True)
        hf_ahfa.attention(q, k, v, causal=True, softcap=30.0)  # SDPA has no softcap: our split-KV kernel
    assert [r["route"] for r in rec] == ["sdpa", "decode"] and fastest._times == {}


def test_float32_exact_calls_go_to_sdpa_untimed(monkeypatch):
    # (timing ours would compile float32 kernels first: ~40 s per launch config at head dim 256)
    from hf_ahfa import fastest

    monkeypatch.setattr(fastest, "_times", {})
    q, k, v = (torch.randn(1, 300, 4, 256, device="cuda", requires_grad=True) for _ in "qkv")
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q, k, v, causal=True).sum().backward()
        hf_ahfa.attention(q, k, v, causal=True, softcap=30.0)  # SDPA has no softcap: ours
    assert [r["route"] for r in rec] == ["sdpa", "flash"] and fastest._times == {}


@pytest.mark.parametrize("Q,K", [(777, 777), (1, 1500)])
def test_padded_calls_through_sdpa_match_reference(Q, K):
    """Padded batches through SDPA on CUDA (one boolean mask, causality folded in; decode rows with a static
    cache's mask): the reference's output and gradients, and exact zeros with zero gradients where a row sees no
    key (left padding, a fully padded batch row), as our kernels give."""
    g = torch.Generator(device="cuda").manual_seed(Q)
    q = torch.randn(3, Q, 8, 64, device="cuda", generator=g).to(BF16).requires_grad_()
    k, v = (torch.randn(3, K, 2, 64, device="cuda", generator=g).to(BF16).requires_grad_() for _ in "kv")
    kpm = torch.ones(3, K, dtype=torch.bool, device="cuda")
    kpm[1, :300] = False
    kpm[2] = False
    out = hf_ahfa.attention(q, k, v, causal=True, key_padding_mask=kpm, backend="sdpa")
    gout = torch.randn(out.shape, device="cuda", generator=g).to(BF16)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = hf_ahfa.attention(*leaves, causal=True, key_padding_mask=kpm, backend="reference")
    want = (ref, *torch.autograd.grad(ref, leaves, gout.float()))
    for name, got, w in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        err = ((got.float() - w).abs().max() / w.abs().max()).item()
        assert err < 0.01, f"{name}: relative error {err:.3g}"
    assert (out[2] == 0).all() and (grads[0][2] == 0).all() and (Q == 1 or (out[1, :300] == 0).all())
    with hf_ahfa.record() as rec:
        hf_ahfa.attention(q.detach(), k.detach(), v.detach(), causal=True, key_padding_mask=kpm)
    assert rec[0]["route"] in (("sdpa",) if Q == 1 else ("sdpa", "flash"))  # decode: SDPA untimed



@pytest.mark.parametrize("causal, sparse", [(True, False), (False, False), (False, True)],
                         ids=["causal", "bidirectional-2-steps", "bidirectional-2-steps-adaptive-tau1"])
def test_ring_steps_on_our_kernels(causal, sparse):
    """One rank's view of torch's ring engine on our kernels (bf16): ``ring_step`` per key part, merged by lse as
    the engine merges, then ``ring_step_backward`` per part from the merged out and lse: the float32 reference's
    output and gradients of the whole call."""
    from hf_ahfa.adaptive import estimate_layout
    from hf_ahfa.context_parallel import ring_step, ring_step_backward

    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(1, 2048, 8, 64, device="cuda", generator=g).to(BF16)
    k, v = (torch.randn(1, 2048, 2, 64, device="cuda", generator=g).to(BF16) for _ in "kv")
    gout = torch.randn(q.shape, device="cuda", generator=g).to(BF16)
    policy = hf_ahfa.AdaptivePolicy(mode="adaptive", tau=1.0, density_limit=1.0)
    qs, gs = q.transpose(1, 2), gout.transpose(1, 2)
    parts = [(kp.transpose(1, 2), vp.transpose(1, 2)) for kp, vp in zip(k.chunk(1 if causal else 2, 1),
                                                                         v.chunk(1 if causal else 2, 1))]
    layouts = [estimate_layout(q, kp.transpose(1, 2), policy, causal=causal) if sparse else None for kp, _ in parts]
    with torch.no_grad():
        steps = [ring_step(qs, kp, vp, is_causal=causal, backend="triton", layout=layout)
                 for (kp, vp), layout in zip(parts, layouts)]
    lse = torch.logsumexp(torch.stack([l for _, l in steps]), 0)
    out = sum(o.float() * torch.exp(l - lse)[..., None] for o, l in steps).to(BF16)
    grads = [ring_step_backward(grad_out=gs, query=qs, key=kp, value=vp, out=out, logsumexp=lse, is_causal=causal,
                                backend="triton", layout=layout) for (kp, vp), layout in zip(parts, layouts)]
    dq = sum(d[0].float() for d in grads)
    dk, dv = (torch.cat([d[i] for d in grads], 2).float() for i in (1, 2))
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = hf_ahfa.attention(*leaves, causal=causal, backend="reference")
    want = (ref, *torch.autograd.grad(ref, leaves, gout.float()))
    for name, got, w in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):  # ours in SDPA layout
        err = ((got.float().transpose(1, 2) - w).abs().max() / w.abs().max()).item()
        assert err < 0.01, f"{name}: relative error {err:.3g}"
