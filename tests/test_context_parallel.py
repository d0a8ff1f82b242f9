"""Context parallelism on the CPU: two gloo processes against one process on the whole sequence."""

from __future__ import annotations

import datetime
import json
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import hf_ahfa
from hf_ahfa.context_parallel import ring_attention, ring_step, shard_sequence, unshard_sequence

WORLD = 2
B, T, HQ, HKV, D = 1, 128, 4, 2, 16  # T = 2 * WORLD chunks of 32 queries: two blocks of 16 for the adaptive case
TOL = dict(atol=1e-5, rtol=1e-5)
EXACT_SPARSE = hf_ahfa.AdaptivePolicy(mode="adaptive", tau=1.0, density_limit=1.0, block_size=16, stride=4)


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, HQ, D, generator=g)
    k = torch.randn(B, T, HKV, D, generator=g)
    v = torch.randn(B, T, HKV, D, generator=g)
    grad_out = torch.randn(B, T, HQ, D, generator=g)
    return q, k, v, grad_out


def _spawn(worker, *args):
    """Run ``worker(rank, *args)`` in WORLD fresh processes of one gloo group (this file run as a script: a
    spawned child could not import this test module, and forking after OpenMP work can hang)."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, worker.__name__, json.dumps([rank, port, *args])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()  # only one still running after a timeout
    for rank, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank}:\n{output[-4000:]}"


def _run_in_group(rank, port, worker, args):
    torch.set_num_threads(1)  # WORLD processes share the cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def _ring_worker(rank, causal, sparse):
    policy = EXACT_SPARSE if sparse else None
    q, k, v, grad_out = _inputs()
    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    want, want_lse = hf_ahfa.attention(*whole, causal=causal, return_lse=True)
    want.backward(grad_out)

    mine = [shard_sequence(x, rank, WORLD).requires_grad_() for x in (q, k, v)]
    with hf_ahfa.record() as calls:
        out, lse = ring_attention(*mine, causal=causal, return_lse=True, policy=policy)
    out.backward(shard_sequence(grad_out, rank, WORLD))

    if policy is not None:  # it ran block-sparse, not an exact fallback
        assert calls and all(c["path"] == "sparse" for c in calls), calls
    torch.testing.assert_close(out, shard_sequence(want, rank, WORLD), **TOL)
    torch.testing.assert_close(lse, shard_sequence(want_lse, rank, WORLD, dim=2), **TOL)
    for name, x, ref in zip("qkv", mine, whole):
        torch.testing.assert_close(x.grad, shard_sequence(ref.grad, rank, WORLD), **TOL, msg=lambda m: f"d{name}: {m}")
    torch.testing.assert_close(unshard_sequence(out.detach()), want.detach(), **TOL)


def _engine_worker(rank, causal):
    from torch.distributed.tensor.experimental._attention import _cp_options, _templated_ring_attention

    q, k, v, _ = _inputs()
    want, want_lse = hf_ahfa.attention(q, k, v, causal=causal, return_lse=True)
    # the engine's load balancing is the head-tail layout of shard_sequence, and it refuses it for non-causal
    # calls (a module global: this process is ours)
    _cp_options.enable_load_balance = causal
    sdpa_layout = [shard_sequence(x, rank, WORLD).transpose(1, 2) for x in (q, k, v)]
    with torch.no_grad():
        out, lse = _templated_ring_attention(dist.group.WORLD, 2, ring_step, *sdpa_layout, is_causal=causal)
    torch.testing.assert_close(out.transpose(1, 2), shard_sequence(want, rank, WORLD), **TOL)
    torch.testing.assert_close(lse, shard_sequence(want_lse, rank, WORLD, dim=2), **TOL)


@pytest.mark.parametrize("causal, sparse", [(True, False), (False, False), (True, True)],
                         ids=["causal", "bidirectional", "causal-adaptive-tau1"])
def test_ring_attention_matches_one_process(causal, sparse):
    _spawn(_ring_worker, causal, sparse)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_torch_ring_engine_runs_ring_step(causal):
    _spawn(_engine_worker, causal)


def test_bad_input_names_the_argument():
    q, k, v = torch.zeros(1, 6, 4, 8), torch.zeros(1, 6, 2, 8), torch.zeros(1, 6, 2, 8)
    with pytest.raises(ValueError, match="x: sequence length 6"):
        shard_sequence(q, 0, 2)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        ring_attention(q, k, v)
    with pytest.raises(TypeError, match="group must be"):
        ring_attention(q, k, v, "world")
    with pytest.raises(ValueError, match="q, k: causal"):
        ring_attention(q[:, :3], k[:, :3], v[:, :3], causal=True)
    with pytest.raises(TypeError, match="attn_mask"):
        ring_attention(q, k, v, attn_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="window needs causal=True"):
        ring_attention(q, k, v, window=2)
    with pytest.raises(ValueError, match="forward only"):
        ring_step(q.transpose(1, 2).requires_grad_(), k.transpose(1, 2), v.transpose(1, 2))


if __name__ == "__main__":  # one rank of _spawn: python test_context_parallel.py WORKER '[rank, port, *args]'
    rank, port, *args = json.loads(sys.argv[2])
    _run_in_group(rank, port, globals()[sys.argv[1]], args)
