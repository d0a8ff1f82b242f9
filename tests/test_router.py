"""The router: which path each call takes (as ``record()`` reports it), and that each path is exact."""

from __future__ import annotations

import pytest
import torch

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
    expected = oracle(q, k, v, causal=True)[0]
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


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
