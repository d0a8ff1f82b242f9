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
