"""Named sparse patterns (``hf_ahfa.patterns``): each token mask equals its definition written per token, and
the block-sparse kernels equal the oracle under it (forward and gradients)."""

from __future__ import annotations

import pytest
import torch

import hf_ahfa
from hf_ahfa import patterns


def _per_token(q_len, k_len, block, keep_block):
    """The token mask from a predicate on (query block, key block, diagonal block), one token pair at a time."""
    mask = torch.zeros(q_len, k_len, dtype=torch.bool)
    for t in range(q_len):
        i = t // block
        diag = (i * block + max(k_len - q_len, 0)) // block
        for s in range(k_len):
            mask[t, s] = keep_block(i, s // block, diag)
    return mask


SHAPES = [(64, 64), (50, 90), (90, 50), (33, 33)]


@pytest.mark.parametrize("q_len,k_len", SHAPES)
def test_token_masks_equal_their_definitions(q_len, k_len):
    b = 16
    cases = [
        (patterns.local(q_len, k_len, block=b, width=1), lambda i, j, d: abs(j - d) <= 1),
        (patterns.strided(q_len, k_len, block=b, stride=2), lambda i, j, d: (d - j) % 2 == 0),
        (patterns.global_blocks(q_len, k_len, block=b, n=1), lambda i, j, d: j < 1 or i < 1),
    ]
    for layout, rule in cases:
        assert torch.equal(layout.to_token_mask()[0, 0], _per_token(q_len, k_len, b, rule))
    both = patterns.union(cases[0][0], cases[2][0])
    want = _per_token(q_len, k_len, b, lambda i, j, d: abs(j - d) <= 1 or j < 1 or i < 1)
    assert torch.equal(both.to_token_mask()[0, 0], want)


def test_local_is_tridiagonal_in_blocks():
    dense = patterns.local(64, 64, block=16, width=1).to_dense()[0, 0].int()
    assert dense.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]


def test_random_blocks_per_row_head_and_seed():
    a = patterns.random_blocks(128, 128, block=16, n=3, seed=1, batch=2, heads=4).to_dense()
    assert a.shape == (2, 4, 8, 8) and (a.sum(-1) == 3).all()
    assert not torch.equal(a[0, 0], a[0, 1])  # each head draws its own
    assert torch.equal(a, patterns.random_blocks(128, 128, block=16, n=3, seed=1, batch=2, heads=4).to_dense())
    assert not torch.equal(a, patterns.random_blocks(128, 128, block=16, n=3, seed=2, batch=2, heads=4).to_dense())


@pytest.mark.parametrize("bad, message", [
    (lambda: patterns.local(64, 64, block=24), "block must be a positive multiple of 16"),
    (lambda: patterns.local(64, 64, width=-1), "width must be an int >= 0"),
    (lambda: patterns.strided(64, 64, stride=0), "stride must be an int >= 1"),
    (lambda: patterns.global_blocks(0, 64), "q_len must be a positive int"),
    (lambda: patterns.union(), "at least one layout"),
    (lambda: patterns.union(patterns.local(64, 64, block=16), patterns.local(64, 80, block=16)), "different grids"),
])
def test_bad_arguments_name_themselves(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("q_len,k_len,causal", [(64, 64, True), (40, 72, True), (48, 48, False)])
def test_attention_under_a_pattern_equals_the_oracle(backend, q_len, k_len, causal, oracle):
    H, Hkv, D, b = 4, 2, 16, 16
    layout = patterns.union(patterns.local(q_len, k_len, block=b, width=1, heads=H),
                            patterns.global_blocks(q_len, k_len, block=b, n=1, heads=H),
                            patterns.random_blocks(q_len, k_len, block=b, n=1, seed=3, heads=H))
    g = torch.Generator().manual_seed(q_len + k_len)
    q = torch.randn(1, q_len, H, D, generator=g, requires_grad=True)
    k, v = (torch.randn(1, k_len, Hkv, D, generator=g, requires_grad=True) for _ in "kv")
    out = hf_ahfa.attention(q, k, v, causal=causal, layout=layout, backend=backend)
    want = oracle(*(t.detach().double().requires_grad_() for t in (q, k, v)), causal=causal,
                  attn_mask=layout.to_token_mask())[0]
    torch.testing.assert_close(out.double(), want.detach(), atol=2e-5, rtol=2e-5)
    gout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), gout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(oracle(*leaves, causal=causal, attn_mask=layout.to_token_mask())[0], leaves,
                               gout.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, atol=5e-5, rtol=5e-5)


SPEC = "local:width=1+global_blocks:n=1+random_blocks:n=1,seed=3"


def test_a_policy_pattern_is_the_layout_it_names():
    """mode="pattern" builds the layout of its spec for each call shape: the same result as passing that
    layout, on both backends, prefill and a decode-like call (one query over many keys)."""
    H, Hkv, D, b = 4, 2, 16, 16
    policy = hf_ahfa.AdaptivePolicy(mode="pattern", pattern=SPEC, block_size=b)
    for q_len, k_len in ((64, 64), (1, 80)):
        g = torch.Generator().manual_seed(q_len)
        q = torch.randn(1, q_len, H, D, generator=g)
        k, v = (torch.randn(1, k_len, Hkv, D, generator=g) for _ in "kv")
        layout = patterns.union(patterns.local(q_len, k_len, block=b, width=1, heads=H),
                                patterns.global_blocks(q_len, k_len, block=b, n=1, heads=H),
                                patterns.random_blocks(q_len, k_len, block=b, n=1, seed=3, heads=H))
        assert torch.equal(patterns.from_spec(SPEC, q_len, k_len, b, 1, H, None).to_dense(), layout.to_dense())
        for backend in ("reference", "triton"):
            with hf_ahfa.record() as rec:
                got = hf_ahfa.attention(q, k, v, causal=True, policy=policy, backend=backend)
            assert [r["route"] for r in rec] == ["layout"]
            torch.testing.assert_close(got, hf_ahfa.attention(q, k, v, causal=True, layout=layout, backend=backend),
                                       atol=0, rtol=0)


@pytest.mark.parametrize("spec,message", [
    ("", "non-empty spec"),
    ("window:width=2", "unknown pattern 'window'"),
    ("local:width=two", "'width=two' is not one of"),
    ("local:size=2", "'size=2' is not one of"),
])
def test_a_bad_pattern_spec_names_its_part(spec, message):
    with pytest.raises(ValueError, match=message):
        hf_ahfa.AdaptivePolicy(mode="pattern", pattern=spec)


def test_a_model_runs_its_pattern_in_every_layer_and_keeps_it(tmp_path):
    """Per model: configure(mode="pattern") runs every layer (prefill and generate's decode steps) through the
    layout; saved with the model; a padded batch (dense mask) is refused with a clear error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_ahfa.policy import policy_of

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                  max_position_embeddings=256, attn_implementation="ahfa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids).logits
        hf_ahfa.configure(model, mode="pattern", pattern="local:width=1", block_size=16)
        with hf_ahfa.record() as rec:
            local = model(ids).logits
            model.generate(ids, max_new_tokens=3, do_sample=False)
        assert {r["route"] for r in rec} == {"layout"} and len(rec) == 2 * 4
        # a query more than a block past its key block's neighbours sees less than all of its past
        assert (local[0, :32] - exact[0, :32]).abs().max() < 1e-5 and (local[0, 48:] - exact[0, 48:]).abs().max() > 1e-4
        model.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ahfa").eval()
        assert policy_of(loaded.config).pattern == "local:width=1"
        torch.testing.assert_close(loaded(ids).logits, local)
        with pytest.raises(ValueError, match="mode='pattern' runs on unpacked calls without a dense attention mask"):
            loaded(ids, attention_mask=torch.cat([torch.zeros(1, 4), torch.ones(1, 76)], 1).long())
