"""Bad input to ``hf_ahfa.attention`` raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

import hf_ahfa


def qkv(B=2, Q=5, K=7, Hq=4, Hkv=2, D=16, dtype=torch.float32):
    return torch.randn(B, Q, Hq, D, dtype=dtype), torch.randn(B, K, Hkv, D, dtype=dtype), torch.randn(B, K, Hkv, D, dtype=dtype)


q, k, v = qkv()
q1, k1, v1 = qkv(B=1, Q=6, K=6)

CASES = [
    # (id, args, kwargs, exception, words the message must contain)
    ("q not a tensor", (q.tolist(), k, v), {}, TypeError, "q must be a torch.Tensor"),
    ("3-D q", (q[0], k, v), {}, ValueError, "q must have shape"),
    ("batch mismatch", (q, k[:1], v[:1]), {}, ValueError, "batch size"),
    ("k/v length mismatch", (q, k, v[:, :3]), {}, ValueError, "sequence length"),
    ("k/v heads mismatch", (q, k, torch.randn(2, 7, 1, 16)), {}, ValueError, "number of heads"),
    ("Hq not multiple of Hkv", (torch.randn(2, 5, 3, 16), k, v), {}, ValueError, "multiple of k/v's heads"),
    ("q/k head dim mismatch", (torch.randn(2, 5, 4, 8), k, v), {}, ValueError, "head_dim"),
    ("head dim > 256", qkv(D=320), {}, ValueError, "head_dim must be in [1, 256]"),
    ("integer dtype", (q.long(), k.long(), v.long()), {}, TypeError, "float16, bfloat16, float32 or float64"),
    ("mixed dtypes", (q, k.double(), v), {}, TypeError, "share one dtype"),
    ("devices differ", (q, k.to("meta"), v), {}, ValueError, "one device"),
    ("window 0", (q, k, v), dict(window=0), ValueError, "window must be >= 1"),
    ("window negative pair", (q, k, v), dict(window=(-1, 2)), ValueError, "window=(left, right)"),
    ("window float", (q, k, v), dict(window=2.5), TypeError, "window must be None"),
    ("window bool", (q, k, v), dict(window=True), TypeError, "window must be None"),
    ("softcap 0", (q, k, v), dict(softcap=0.0), ValueError, "softcap"),
    ("dropout 1", (q, k, v), dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("scale nan", (q, k, v), dict(scale=float("nan")), ValueError, "scale"),
    ("NaN sinks", (q, k, v), dict(sinks=torch.tensor([0.0, float("nan"), 0.0, 0.0])), ValueError, "sinks contains NaN"),
    ("sinks shape", (q, k, v), dict(sinks=torch.zeros(2)), ValueError, "sinks must be"),
    ("padding mask dtype", (q, k, v), dict(key_padding_mask=torch.ones(2, 7)), TypeError, "key_padding_mask"),
    ("padding mask shape", (q, k, v), dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask"),
    ("attn_mask shape", (q, k, v), dict(attn_mask=torch.ones(2, 3, 5, 7, dtype=torch.bool)), ValueError, "attn_mask"),
    ("cu_seqlens with batch 2", (q, k, v), dict(cu_seqlens=torch.tensor([0, 5])), ValueError, "batch size 1"),
    ("cu_seqlens decreasing", (q1, k1, v1), dict(cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, "non-decreasing"),
    ("cu_seqlens not from 0", (q1, k1, v1), dict(cu_seqlens=torch.tensor([1, 6])), ValueError, "start at 0"),
    ("cu_seqlens wrong end", (q1, k1, v1), dict(cu_seqlens=torch.tensor([0, 3, 5])), ValueError, "end at the packed length 6"),
    ("cu_seqlens float", (q1, k1, v1), dict(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "int32/int64"),
    ("unknown backend", (q, k, v), dict(backend="cuda"), ValueError, "backend"),
    ("softcap bool", (q, k, v), dict(softcap=True), ValueError, "softcap"),
    ("causal string", (q, k, v), dict(causal="false"), TypeError, "causal must be a bool"),
    ("policy dict", (q, k, v), dict(policy={"mode": "adaptive"}), TypeError, "policy must be a hf_ahfa.AdaptivePolicy"),
    ("policy string", (q, k, v), dict(policy="adaptive"), TypeError, "policy must be a hf_ahfa.AdaptivePolicy"),
    ("meta tensors", (q.to("meta"), k.to("meta"), v.to("meta")), {}, ValueError, "meta tensors"),
    ("layout block 0", (q1, k1, v1), dict(layout=hf_ahfa.BlockLayout(
        torch.ones(1, 4, 1, dtype=torch.int32), torch.zeros(1, 4, 1, 1, dtype=torch.int32), 0, 16, 6, 6)),
     ValueError, "layout block sizes must be positive ints"),
    ("layout index out of range", (q1, k1, v1), dict(layout=hf_ahfa.BlockLayout(
        torch.ones(1, 4, 1, dtype=torch.int32), torch.full((1, 4, 1, 1), 7, dtype=torch.int32), 16, 16, 6, 6)),
     ValueError, "kv_index in [0, 1)"),
    ("layout count out of range", (q1, k1, v1), dict(layout=hf_ahfa.BlockLayout(
        torch.full((1, 4, 1), 3, dtype=torch.int32), torch.zeros(1, 4, 1, 1, dtype=torch.int32), 16, 16, 6, 6)),
     ValueError, "kv_count must lie in [0, 1]"),
]


@pytest.mark.parametrize("args,kwargs,exc,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        hf_ahfa.attention(*args, **kwargs)
    assert words in str(info.value)


def test_forced_triton_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("AHFA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="backend 'triton' was requested but cannot run.*float64"):
        hf_ahfa.attention(q.double(), k.double(), v.double())



def test_env_backend_reference_and_bad_name(monkeypatch):
    monkeypatch.setenv("AHFA_BACKEND", "reference")
    assert torch.isfinite(hf_ahfa.attention(q, k, v)).all()
    monkeypatch.setenv("AHFA_BACKEND", "fast")
    with pytest.raises(ValueError, match="AHFA_BACKEND"):
        hf_ahfa.attention(q, k, v)
