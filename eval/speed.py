"""Kernel-level speed: ``ahfa`` against PyTorch's attention kernels on the same inputs in the same run.

Providers: ``ahfa`` (Triton kernels), SDPA's flash (FA2), cuDNN and memory-efficient backends,
FlexAttention (compiled), and flash-attn when installed. Every time is a ``triton.testing.do_bench``
median (20/80 % quantiles kept) on fresh random inputs. FLOPs: ``4 B H Q K D``, halved for causal, x3.5
for forward+backward. Decode rows report bytes moved per second instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

import hf_ahfa
from hf_ahfa.select import band_of_shape

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
}
PROVIDERS = ("ahfa", "ahfa-auto", "ahfa-sparse-D", "ahfa-estimate", "sdpa", *SDPA_BACKENDS, "flex", "flash-attn")


def known_provider(name: str) -> bool:
    """Whether ``name`` is a provider (``ahfa-sparse-D`` with a share ``0 < D <= 1``)."""
    if name.startswith("ahfa-sparse-"):
        try:
            return 0 < float(name.removeprefix("ahfa-sparse-")) <= 1
        except ValueError:
            return False
    return name in PROVIDERS


@dataclass
class Row:
    kind: str  # "prefill" or "decode"
    provider: str
    mode: str  # "fwd" or "fwd+bwd"
    causal: bool
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    ms: float | None
    ms_p20: float | None
    ms_p80: float | None
    tflops: float | None = None
    tbps: float | None = None
    error: str | None = None
    density: float | None = None  # ahfa-sparse-D: the share of causal blocks actually computed


def attention_flops(B, H, Q, K, D, causal, mode):
    flops = 4 * B * H * Q * K * D / (2 if causal else 1)
    return flops * (3.5 if mode == "fwd+bwd" else 1.0)


def sparse_density(name: str) -> float | None:
    """``ahfa-sparse-D``: the block-sparse kernels on a random layout keeping share ``D`` of the causal
    blocks (sink and diagonal blocks always kept), which measures how density turns into time."""
    return float(name.removeprefix("ahfa-sparse-")) if name.startswith("ahfa-sparse-") else None


def visible_blocks(T: int, causal: bool, device, block: int = 128) -> torch.Tensor:
    """``(1, 1, n, n)`` bool: the blocks of a ``T x T`` self-attention with any visible pair (queries and
    keys share positions, so a causal one keeps the blocks on and below the diagonal)."""
    n = -(-T // block)
    ones = torch.ones(n, n, dtype=torch.bool, device=device)
    return (ones.tril() if causal else ones)[None, None]


def random_layout(B, H, T, density, causal, device, block=128, seed=0):
    """A layout keeping about ``density`` of the visible 128x128 blocks, plus sink and diagonal blocks; the kept
    blocks that every query of theirs fully sees are listed as needing no element mask, by the rule the adaptive
    selection uses (``band_of_shape``)."""
    n = -(-T // block)
    g = torch.Generator(device=device).manual_seed(seed)
    touched, full = band_of_shape(T, T, block, block, causal, None, device)
    keep = torch.rand(B, H, n, n, generator=g, device=device) < density
    keep[..., 0] = True
    keep |= torch.eye(n, dtype=torch.bool, device=device)
    return hf_ahfa.BlockLayout.from_dense(keep & touched, block, block, T, T, full=keep & full)


def _provider_fn(name, q, k, v, causal):
    """A no-argument callable computing attention with provider ``name`` on (B, T, H, D) tensors."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D) views, as Transformers gives SDPA
    gqa = q.shape[2] != k.shape[2]
    if name == "ahfa":  # our own kernels
        return lambda: hf_ahfa.attention(q, k, v, causal=causal, backend="triton")
    if name == "ahfa-auto":  # what a user gets: the router's choice between our kernels and SDPA's
        return lambda: hf_ahfa.attention(q, k, v, causal=causal)
    if (density := sparse_density(name)) is not None:
        layout = random_layout(q.shape[0], q.shape[2], q.shape[1], density, causal, q.device)
        return lambda: hf_ahfa.attention(q, k, v, causal=causal, backend="triton", layout=layout)
    if name == "ahfa-estimate":  # the adaptive mode's estimator and block selection alone
        policy = hf_ahfa.AdaptivePolicy(mode="adaptive")
        return lambda: hf_ahfa.estimate_layout(q, k, policy, causal=causal, backend="triton")
    if name == "sdpa":  # PyTorch's own choice of backend
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
    if name in SDPA_BACKENDS:
        backend = SDPA_BACKENDS[name]

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)

        return run
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        B, Q, H, _ = q.shape
        K = k.shape[1]
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, i, j: j <= i + (K - Q), None, None, Q, K, device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda: flex(qt, kt, vt, block_mask=mask, enable_gqa=gqa)
    if name == "flash-attn":
        from flash_attn import flash_attn_func

        return lambda: flash_attn_func(q, k, v, causal=causal)
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def _bench(fn, grads, mode):
    from triton.testing import do_bench

    if mode == "fwd":
        with torch.no_grad():
            return do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    out = fn()
    g = torch.randn_like(out)
    return do_bench(lambda: fn().backward(g), warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)


def bench_prefill(provider, B, H, T, D, causal, mode, dtype=torch.bfloat16, kv_heads=None) -> Row:
    kv_heads = kv_heads or H
    row = Row("prefill", provider, mode, causal, B, H, kv_heads, T, T, D, None, None, None)
    try:
        q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=mode != "fwd")
        k, v = (torch.randn(B, T, kv_heads, D, device="cuda", dtype=dtype, requires_grad=mode != "fwd")
                for _ in range(2))
        ms, lo, hi = _bench(_provider_fn(provider, q, k, v, causal), [q, k, v], mode)
    except Exception as err:  # noqa: BLE001 - a provider that cannot run this shape is reported, not fatal
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return row
    row.ms, row.ms_p20, row.ms_p80 = ms, lo, hi
    share = 1.0
    if sparse_density(provider) is not None:
        layout = random_layout(B, H, T, sparse_density(provider), causal, "cuda")
        row.density = share = layout.density(visible_blocks(T, causal, "cuda"))
    # TFLOP/s of the work done: a sparse run counts only the blocks it computed (the estimator: none)
    if provider != "ahfa-estimate":
        row.tflops = share * attention_flops(B, H, T, T, D, causal, mode) / (ms * 1e-3) / 1e12
    return row


def bench_decode(provider, B, H, kv_heads, K, D, dtype=torch.bfloat16) -> Row:
    # one query sees every cached key: non-causal, which every SDPA backend accepts for q_len != k_len
    row = Row("decode", provider, "fwd", False, B, H, kv_heads, 1, K, D, None, None, None)
    try:
        q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype)
        k, v = (torch.randn(B, K, kv_heads, D, device="cuda", dtype=dtype) for _ in range(2))
        ms, lo, hi = _bench(_provider_fn(provider, q, k, v, causal=False), [], "fwd")
    except Exception as err:  # noqa: BLE001
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return row
    row.ms, row.ms_p20, row.ms_p80 = ms, lo, hi
    moved = (2 * B * K * kv_heads * D + 2 * B * H * D) * torch.finfo(dtype).bits // 8
    row.tbps = moved / (ms * 1e-3) / 1e12
    return row


DECODE_PROVIDERS = ("ahfa", "ahfa-auto", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")


def run_kernel_sweep(seq_lens, head_dims, modes, providers, causal_opts, decode_lens, tokens=32768, heads=32,
                     progress=True) -> list[dict]:
    """Prefill rows (``tokens`` per batch, ``heads`` heads) then decode rows (batch 8, GQA 32/8, D 128)."""
    jobs = [(p, T, D, c, m) for D in head_dims for m in modes for c in causal_opts for T in seq_lens for p in providers]
    decode_providers = [p for p in DECODE_PROVIDERS if p in providers or p == "sdpa"]
    rows = []
    with tqdm(total=len(jobs) + len(decode_lens) * len(decode_providers), desc="speed", disable=not progress) as bar:
        for p, T, D, c, m in jobs:
            rows.append(asdict(bench_prefill(p, max(1, tokens // T), heads, T, D, c, m)))
            bar.update()
        for K in decode_lens:
            for p in decode_providers:
                rows.append(asdict(bench_decode(p, 8, 32, 8, K, 128)))
                bar.update()
    return rows


def ratios(rows: list[dict], baseline: str) -> dict[tuple, float]:
    """ahfa speed over ``baseline`` (>1 means ahfa is faster) for every shape both measured."""
    key = lambda r: (r["kind"], r["mode"], r["causal"], r["q_len"], r["k_len"], r["head_dim"])  # noqa: E731
    base = {key(r): r["ms"] for r in rows if r["provider"] == baseline and r["ms"]}
    return {key(r): base[key(r)] / r["ms"] for r in rows if r["provider"] == "ahfa" and r["ms"] and key(r) in base}

