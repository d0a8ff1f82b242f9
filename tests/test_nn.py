"""``hf_ahfa.nn.MultiheadAttention`` against ``torch.nn.MultiheadAttention`` (same state dict): outputs, returned
weights and gradients of inputs and parameters; the documented differences; ``replace_attention``."""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import pytest
import torch

import hf_ahfa
from hf_ahfa import nn as ahfa_nn

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=1e-4)}


def _pair(dtype, seed=0, **kw):
    """torch's module and ours with the same (random, biases included) parameters."""
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(dtype=dtype, **kw)
    with torch.no_grad():
        for p in ref.parameters():  # torch zeroes the biases: make them matter
            if p.dim() == 1:
                p.normal_()
    ours = ahfa_nn.MultiheadAttention(dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(ref, dtype, N, L, S, batched=True, self_attn=False, seed=1):
    """query, key, value in the module's layout (``key is value`` for cross-attention, all one for self)."""
    g = torch.Generator().manual_seed(seed)

    def make(T, E):
        shape = ((N, T, E) if ref.batch_first else (T, N, E)) if batched else (T, E)
        return torch.randn(shape, generator=g, dtype=dtype)

    query = make(L, ref.embed_dim)
    if self_attn:
        return query, query, query
    key = make(S, ref.kdim)
    value = key if ref.kdim == ref.vdim else make(S, ref.vdim)
    return query, key, value


def _leaves(query, key, value):
    """Fresh leaves that keep the `is` relations torch's and our projections look at."""
    q = query.detach().clone().requires_grad_()
    k = q if key is query else key.detach().clone().requires_grad_()
    v = k if value is key else value.detach().clone().requires_grad_()
    return q, k, v


def _run(module, inputs, kwargs, seed=2):
    q, k, v = _leaves(*inputs)
    out, weights = module(q, k, v, **kwargs)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=g, dtype=weights.dtype)).sum()
    grads = torch.autograd.grad(loss, [q, k, v] + [p for _, p in module.named_parameters()], allow_unused=True)
    names = ["query", "key", "value"] + [n for n, _ in module.named_parameters()]
    return out, weights, dict(zip(names, grads))


def _assert_same(ref, ours, inputs, kwargs, dtype):
    out_r, w_r, g_r = _run(ref, inputs, kwargs)
    out_o, w_o, g_o = _run(ours, inputs, kwargs)
    torch.testing.assert_close(out_o, out_r, **TOL[dtype])
    if w_r is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_r, **TOL[dtype])
    assert g_o.keys() == g_r.keys()
    for name in g_r:
        if g_r[name] is None:
            assert g_o[name] is None, name
        else:
            torch.testing.assert_close(g_o[name], g_r[name], **TOL[dtype], msg=lambda m: f"grad of {name}: {m}")


def _kpm(N, S, kind, dtype, seed=3):
    """Padding at the tail of some rows (key 0 always real): bool True = pad, or float -inf = pad."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (N,), generator=g)
    lengths[0] = S
    pad = torch.arange(S)[None, :] >= lengths[:, None]
    return pad if kind == "bool" else torch.zeros(N, S, dtype=dtype).masked_fill(pad, float("-inf"))


def _attn_mask(shape, kind, dtype, seed=4):
    """A random mask (a third hidden) whose key 0 stays allowed: bool True = hidden, or float -inf = hidden."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.rand(shape, generator=g) < 0.33
    hidden[..., 0] = False
    return hidden if kind == "bool" else torch.zeros(shape, dtype=dtype).masked_fill(hidden, float("-inf"))


E, H, N, L, S = 36, 3, 2, 7, 11  # odd sizes: head dim 12
CASES = {
    "self-batch_first": dict(module=dict(batch_first=True), self_attn=True),
    "self-seq_first": dict(module=dict(batch_first=False), self_attn=True),
    "cross-batch_first": dict(module=dict(batch_first=True)),
    "cross-seq_first": dict(module=dict()),
    "kdim-vdim": dict(module=dict(kdim=20, vdim=28, batch_first=True)),
    "kdim-vdim-seq_first-kpm": dict(module=dict(kdim=20, vdim=28), kpm="bool"),
    "unbatched-self": dict(module=dict(batch_first=True), self_attn=True, batched=False),
    "unbatched-cross-kpm-mask3d": dict(module=dict(), batched=False, kpm="bool", mask=("3d", "bool")),
    "bias-false": dict(module=dict(bias=False, batch_first=True), kpm="bool"),
    "add_bias_kv": dict(module=dict(add_bias_kv=True, batch_first=True)),
    "add_zero_attn": dict(module=dict(add_zero_attn=True)),
    "bias_kv-zero_attn-masks": dict(module=dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
                                    kpm="bool", mask=("2d", "bool")),
    "bias_kv-zero_attn-float-masks-kdim": dict(module=dict(add_bias_kv=True, add_zero_attn=True, kdim=20, vdim=20),
                                               kpm="float", mask=("3d", "float")),
    "kpm-bool": dict(module=dict(batch_first=True), kpm="bool"),
    "kpm-float": dict(module=dict(batch_first=True), kpm="float", self_attn=True, L=S),
    "mask2d-bool": dict(module=dict(batch_first=True), mask=("2d", "bool")),
    "mask2d-float": dict(module=dict(), mask=("2d", "float")),
    "mask3d-bool": dict(module=dict(batch_first=True), mask=("3d", "bool")),
    "mask3d-float-kpm-float": dict(module=dict(batch_first=True), mask=("3d", "float"), kpm="float"),
    "causal-hint-self": dict(module=dict(batch_first=True), self_attn=True, L=S, causal=True),
    "causal-hint-kpm": dict(module=dict(batch_first=True), self_attn=True, L=S, causal=True, kpm="bool"),
    "causal-hint-cross": dict(module=dict(), causal=True),
    "causal-hint-zero_attn": dict(module=dict(add_zero_attn=True, batch_first=True), self_attn=True, L=S,
                                  causal=True),
}


def _case_kwargs(case, dtype, L_, S_, batched):
    kwargs = {}
    if "kpm" in case:
        m = _kpm(N, S_, case["kpm"], dtype)
        kwargs["key_padding_mask"] = m if batched else m[0]
    if "mask" in case:
        dims, kind = case["mask"]
        shape = (L_, S_) if dims == "2d" else ((N if batched else 1) * H, L_, S_)
        kwargs["attn_mask"] = _attn_mask(shape, kind, dtype)
    if case.get("causal"):
        # torch needs the mask with the hint: its own top-left causal mask (bool beside a bool padding mask)
        hidden = torch.ones(L_, S_, dtype=torch.bool).triu(1)
        kwargs["attn_mask"] = hidden if case.get("kpm") == "bool" else \
            torch.zeros(L_, S_, dtype=dtype).masked_fill(hidden, float("-inf"))
        kwargs["is_causal"] = True
    return kwargs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch(name, dtype):
    case = CASES[name]
    ref, ours = _pair(dtype, embed_dim=E, num_heads=H, **case["module"])
    L_ = case.get("L", L)
    S_ = L_ if case.get("self_attn") else S
    batched = case.get("batched", True)
    inputs = _inputs(ref, dtype, N, L_, S_, batched=batched, self_attn=case.get("self_attn", False))
    kwargs = _case_kwargs(case, dtype, L_, S_, batched)
    for need_weights, average in [(False, True), (True, True), (True, False)]:
        _assert_same(ref, ours, inputs, dict(kwargs, need_weights=need_weights, average_attn_weights=average), dtype)


def test_mixed_mask_types_warn_as_torch_does():
    ref, ours = _pair(torch.float32, embed_dim=E, num_heads=H, batch_first=True)
    inputs = _inputs(ref, torch.float32, N, L, S)
    kw = dict(key_padding_mask=_kpm(N, S, "bool", torch.float32), attn_mask=_attn_mask((L, S), "float", torch.float32))
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        expected = ref(*inputs, **kw)[0]
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        got = ours(*inputs, **kw)[0]
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_weight_shapes():
    ref, ours = _pair(torch.float32, embed_dim=E, num_heads=H, add_bias_kv=True, add_zero_attn=True)
    x = torch.randn(L, N, E)
    assert ours(x, x, x)[1].shape == (N, L, L + 2)
    assert ours(x, x, x, average_attn_weights=False)[1].shape == (N, H, L, L + 2)
    assert ours(x[:, 0], x[:, 0], x[:, 0], average_attn_weights=False)[1].shape == (H, L, L + 2)
    assert ours(x, x, x, need_weights=False)[1] is None


def test_causal_hint_replaces_a_wrong_mask_as_torch_does():
    # torch: with is_causal, no key_padding_mask and need_weights=False, attn_mask is ignored for the causal mask
    ref, ours = _pair(torch.float64, embed_dim=E, num_heads=H, batch_first=True)
    inputs = _inputs(ref, torch.float64, N, L, S)
    wrong = _attn_mask((L, S), "bool", torch.float64)
    _assert_same(ref, ours, inputs, dict(attn_mask=wrong, is_causal=True, need_weights=False), torch.float64)
    # ... and is a hint only otherwise: the mask is applied
    _assert_same(ref, ours, inputs, dict(attn_mask=wrong, is_causal=True, need_weights=True), torch.float64)


@pytest.mark.parametrize("L_,S_", [(L, L), (L, S), (S, L)])
def test_is_causal_without_mask_is_causal(L_, S_):
    """Documented difference: torch raises (its functional path needs attn_mask with the hint); ours applies
    torch's own causal mask (query i sees keys j <= i)."""
    ref, ours = _pair(torch.float64, embed_dim=E, num_heads=H, batch_first=True)
    inputs = _inputs(ref, torch.float64, N, L_, S_, self_attn=L_ == S_)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ref(*inputs, is_causal=True)
    causal = torch.ones(L_, S_, dtype=torch.bool).triu(1)  # True = hidden
    for need_weights in (False, True):
        expected = ref(*inputs, attn_mask=causal, need_weights=need_weights)
        got = ours(*inputs, is_causal=True, need_weights=need_weights)
        torch.testing.assert_close(got[0], expected[0], **TOL[torch.float64])
        if need_weights:
            torch.testing.assert_close(got[1], expected[1], **TOL[torch.float64])


def test_fully_masked_rows_give_zeros_not_nan():
    """Documented difference: a query that sees no key gets zero attention (output = out_proj.bias) and zero
    weights; torch's weights path gives NaN there."""
    ref, ours = _pair(torch.float64, embed_dim=E, num_heads=H, batch_first=True)
    inputs = _inputs(ref, torch.float64, N, L, S)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1] = True  # batch row 1: every key padded
    out_r, w_r = ref(*inputs, key_padding_mask=kpm)
    assert out_r[1].isnan().all() and w_r[1].isnan().all()
    q, k, v = _leaves(*inputs)
    for need_weights in (True, False):
        out, w = ours(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
        torch.testing.assert_close(out[1], ours.out_proj.bias.expand(L, E))
        torch.testing.assert_close(out[0], out_r[0], **TOL[torch.float64])
        if need_weights:
            assert (w[1] == 0).all()
            torch.testing.assert_close(w[0], w_r[0], **TOL[torch.float64])
        grads = torch.autograd.grad(out.sum(), [q, k])
        assert all(g.isfinite().all() for g in grads)
    # one row of an attention mask hides every key: only that query is affected
    mask = torch.zeros(L, S, dtype=torch.bool)
    mask[3] = True
    out, w = ours(*inputs, attn_mask=mask)
    torch.testing.assert_close(out[:, 3], ours.out_proj.bias.expand(N, E))
    assert (w[:, 3] == 0).all() and out.isfinite().all()


def test_dropout_only_in_training():
    ref, ours = _pair(torch.float64, embed_dim=E, num_heads=H, batch_first=True, dropout=0.5)
    inputs = _inputs(ref, torch.float64, N, L, S)
    ref.eval(), ours.eval()
    _assert_same(ref, ours, inputs, dict(average_attn_weights=False), torch.float64)
    _, w_eval = ours(*inputs, average_attn_weights=False)
    ours.train()
    torch.manual_seed(0)
    out, w = ours(*inputs, average_attn_weights=False)
    kept = w != 0
    assert 0.3 < kept.double().mean() < 0.7
    torch.testing.assert_close(w[kept], 2 * w_eval[kept])  # kept probabilities scaled by 1 / (1 - p)
    seen = []
    real = ahfa_nn.attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real(*args, **kwargs)

    ahfa_nn.attention = spy
    try:
        ours(*inputs, need_weights=False)
        ours.eval()
        ours(*inputs, need_weights=False)
    finally:
        ahfa_nn.attention = real
    assert seen == [0.5, 0.0]


@pytest.mark.parametrize("module_kw", [dict(), dict(kdim=20, vdim=28, add_bias_kv=True, bias=False)],
                         ids=["packed", "separate"])
def test_state_dict_both_ways(module_kw):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, **module_kw)
    ours = ahfa_nn.MultiheadAttention(E, H, **module_kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.MultiheadAttention(E, H, **module_kw)
    back.load_state_dict(ours.state_dict())
    for (n, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), n
    assert isinstance(ours, torch.nn.MultiheadAttention)
    for method in ("__init__", "forward"):  # same names, defaults and kinds
        params = [inspect.signature(getattr(cls, method)).parameters.values()
                  for cls in (type(ours), torch.nn.MultiheadAttention)]
        assert [(p.name, p.default, p.kind) for p in params[0]] == [(p.name, p.default, p.kind) for p in params[1]]


def test_triton_backend_matches_torch(monkeypatch):
    """Float32 through the Triton kernels (``TRITON_INTERPRET=1`` on the CPU, set in conftest.py)."""
    monkeypatch.setenv("AHFA_BACKEND", "triton")
    dtype = torch.float32
    for module_kw, kw in [
        (dict(batch_first=True), dict(key_padding_mask=_kpm(N, S, "bool", dtype))),
        (dict(add_zero_attn=True), dict(attn_mask=_attn_mask((N * H, L, S), "bool", dtype))),
    ]:
        ref, ours = _pair(dtype, embed_dim=E, num_heads=H, **module_kw)
        inputs = _inputs(ref, dtype, N, L, S)
        with hf_ahfa.record() as rec:
            _assert_same(ref, ours, inputs, dict(kw, need_weights=False), dtype)
        assert [(r["route"], r["backend"]) for r in rec] == [("flash", "triton")]
    ref, ours = _pair(dtype, embed_dim=E, num_heads=H, batch_first=True)
    inputs = _inputs(ref, dtype, N, L, L, self_attn=True)
    mask = torch.ones(L, L, dtype=torch.bool).triu(1)
    with hf_ahfa.record() as rec:
        _assert_same(ref, ours, inputs, dict(attn_mask=mask, is_causal=True, need_weights=False), dtype)
    assert [(r["route"], r["backend"]) for r in rec] == [("flash", "triton")]


# ------------------------------------------------------------------------------------------ replace_attention

def _encoder(dtype=torch.float32):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True, dtype=dtype)
    return torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # torch's own eval fast path
def test_replace_attention_in_transformer_encoder():
    model = _encoder()
    original = copy.deepcopy(model)
    params = list(model.parameters())
    assert model.use_nested_tensor  # torch's eval fast path (nested tensors) is on
    assert hf_ahfa.nn.replace_attention(model) == 2
    assert all(type(layer.self_attn) is ahfa_nn.MultiheadAttention for layer in model.layers)
    assert all(a is b for a, b in zip(model.parameters(), params))  # the same parameters (optimizers stay valid)
    assert not model.use_nested_tensor and model.layers[0].self_attn.batch_first
    assert hf_ahfa.nn.replace_attention(model) == 0  # already ours
    src = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(5))
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:], pad[2, 4:] = True, True
    real = ~pad

    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(original, mode)()
        for kpm in (None, pad):
            with torch.no_grad():
                expected = original(src, src_key_padding_mask=kpm)
                with hf_ahfa.record() as rec:
                    got = model(src, src_key_padding_mask=kpm)
            assert len(rec) == 2, (mode, rec)  # our forward ran in both layers
            # torch's eval fast path leaves zeros at padded positions; every real position must agree
            torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)
    # training step: gradients flow into the (shared) parameters
    model.train()
    model(src, src_key_padding_mask=pad)[real].sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_layer_built_with_our_module_runs_our_forward_in_eval():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    expected_layer = copy.deepcopy(layer)
    ours = ahfa_nn.MultiheadAttention(32, 4, batch_first=True)
    ours.load_state_dict(layer.self_attn.state_dict())
    layer.self_attn = ours
    src = torch.randn(2, 5, 32)
    with torch.no_grad(), hf_ahfa.record() as rec:
        got = layer(src)
        expected = expected_layer(src)
    assert len(rec) == 1
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # a TransformerEncoder built around it would pass nested tensors: a clear error
    nested = torch.nested.nested_tensor([src[0], src[1, :3]])
    with pytest.raises(TypeError, match="nested tensor.*use_nested_tensor"):
        ours(nested, nested, nested)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, kdim=12, vdim=12)  # seq-first, separate projections
        self.inner = torch.nn.ModuleDict({"cross": torch.nn.MultiheadAttention(16, 4, batch_first=True,
                                                                                add_bias_kv=True)})
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x, memory):
        y = self.attn(x.transpose(0, 1), memory.transpose(0, 1), memory.transpose(0, 1))[0].transpose(0, 1)
        return self.proj(self.inner["cross"](y, x, x)[0])


def test_replace_attention_nested_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), torch.nn.ModuleList([_Block()])).double()
    model[1][0].inner["cross"].eval()  # training flags are kept per module
    x, memory = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 8, 12, dtype=torch.float64)
    before = model[1][0](model[0](x, memory), memory)
    mhas = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert hf_ahfa.nn.replace_attention(model) == 4
    assert all(type(m) is ahfa_nn.MultiheadAttention for m in mhas)
    assert [m.training for m in mhas] == [True, True, True, False]
    assert all(m.in_proj_bias.dtype == torch.float64 for m in mhas)
    with hf_ahfa.record() as rec:
        after = model[1][0](model[0](x, memory), memory)
    assert len(rec) == 4
    torch.testing.assert_close(after, before, **TOL[torch.float64])
    # a bare torch module is replaced too; a subclass of torch's (not ours) is left alone
    bare = torch.nn.MultiheadAttention(16, 2)
    assert hf_ahfa.nn.replace_attention(bare) == 1 and type(bare) is ahfa_nn.MultiheadAttention

    class Custom(torch.nn.MultiheadAttention):
        pass

    assert hf_ahfa.nn.replace_attention(torch.nn.Sequential(Custom(16, 2))) == 0
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        hf_ahfa.nn.replace_attention("model")


# ------------------------------------------------------------------------------------------------ bad input

_mha = ahfa_nn.MultiheadAttention(E, H, kdim=20, vdim=20, batch_first=True)
_q, _k = torch.randn(N, L, E), torch.randn(N, S, 20)
BAD = [
    # (id, args, kwargs, exception, words the message must contain)
    ("query not a tensor", (_q.tolist(), _k, _k), {}, TypeError, "query must be a torch.Tensor"),
    ("4-D query", (_q[None], _k, _k), {}, ValueError, "query must be 3-D"),
    ("2-D key for 3-D query", (_q, _k[0], _k), {}, ValueError, "key must be 3-D"),
    ("query features", (torch.randn(N, L, 12), _k, _k), {}, ValueError, "query must have 36 features"),
    ("key features", (_q, torch.randn(N, S, 36), _k), {}, ValueError, "key must have 20 features"),
    ("value features", (_q, _k, torch.randn(N, S, 36)), {}, ValueError, "value must have 20 features"),
    ("key/value lengths", (_q, _k, _k[:, :4]), {}, ValueError, "key and value must have the same"),
    ("batch sizes", (_q, _k[:1], _k[:1]), {}, ValueError, "same batch size"),
    ("kpm shape", (_q, _k, _k), dict(key_padding_mask=torch.zeros(N, L, dtype=torch.bool)), ValueError,
     "key_padding_mask must have shape (2, 11)"),
    ("kpm dtype", (_q, _k, _k), dict(key_padding_mask=torch.zeros(N, S, dtype=torch.long)), TypeError,
     "key_padding_mask must be a bool or floating-point"),
    ("kpm not a tensor", (_q, _k, _k), dict(key_padding_mask=[[0] * S] * N), TypeError, "key_padding_mask"),
    ("kpm additive", (_q, _k, _k), dict(key_padding_mask=torch.full((N, S), -0.5)), ValueError,
     "key_padding_mask holds values other than 0 and -inf"),
    ("mask shape", (_q, _k, _k), dict(attn_mask=torch.zeros(L, L, dtype=torch.bool)), ValueError,
     "attn_mask must have shape (7, 11)"),
    ("3-D mask shape", (_q, _k, _k), dict(attn_mask=torch.zeros(N, L, S, dtype=torch.bool)), ValueError,
     "attn_mask must have shape"),
    ("mask dtype", (_q, _k, _k), dict(attn_mask=torch.zeros(L, S, dtype=torch.int8)), TypeError,
     "attn_mask must be a bool or floating-point"),
    ("mask additive", (_q, _k, _k), dict(attn_mask=torch.randn(L, S)), ValueError,
     "attn_mask holds values other than 0 and -inf"),
    ("mask NaN", (_q, _k, _k), dict(attn_mask=torch.full((L, S), float("nan"))), ValueError, "attn_mask holds"),
]


@pytest.mark.parametrize("args,kwargs,exc,words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input(args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        _mha(*args, **kwargs)
    assert words in str(info.value)


def test_package_exports_nn():
    assert hf_ahfa.nn is ahfa_nn and "nn" in hf_ahfa.__all__
    assert set(ahfa_nn.__all__) == {"MultiheadAttention", "replace_attention"}


def test_readme_example_runs_as_written():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Models outside Transformers: `hf_ahfa.nn`", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    with hf_ahfa.record() as rec:
        exec(compile(code, "README.md (hf_ahfa.nn)", "exec"), scope)
    assert scope["out"].shape == (2, 100, 256) and scope["out"].isfinite().all() and scope["n"] == 2
    assert len(rec) == 1
