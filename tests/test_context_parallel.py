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
from hf_ahfa.context_parallel import engine_attention, ring_attention, ring_step, shard_sequence, unshard_sequence
from hf_ahfa.spec import make_call

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


def _engine_worker(rank, causal, sparse, backend):
    """hf_ahfa.attention inside torch's own context_parallel(): torch shards the buffers, ahfa's calls run its
    ring engine with ahfa's steps, forward and backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    policy = EXACT_SPARSE if sparse else None
    q, k, v, grad_out = _inputs()
    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    want, want_lse = hf_ahfa.attention(*whole, causal=causal, return_lse=True)
    want.backward(grad_out)

    with context_parallel(init_device_mesh("cpu", (WORLD,)), buffers=[q, k, v, grad_out], buffer_seq_dims=[1] * 4):
        mine = [x.clone().requires_grad_() for x in (q, k, v)]
        with hf_ahfa.record() as calls:
            out, lse = hf_ahfa.attention(*mine, causal=causal, return_lse=True, policy=policy, backend=backend)
            out.backward(grad_out)
    # one call per step of the ring, each on this rank's part (the steps' keys: WORLD parts in turn)
    assert calls and all(c["q_len"] <= T // WORLD and c["k_len"] <= T // WORLD for c in calls), calls
    assert all(c["path"] == ("sparse" if sparse else "exact") for c in calls), calls
    assert all(c["backend"] == (backend or "reference") for c in calls), calls
    torch.testing.assert_close(out, shard_sequence(want, rank, WORLD), **TOL)
    torch.testing.assert_close(lse, shard_sequence(want_lse, rank, WORLD, dim=2), **TOL)
    for name, x, ref in zip("qkv", mine, whole):
        torch.testing.assert_close(x.grad, shard_sequence(ref.grad, rank, WORLD), **TOL, msg=lambda m: f"d{name}: {m}")


def _model_worker(rank):
    """A Transformers model with attn_implementation="ahfa" trained inside torch's context_parallel(): each rank's
    logits are its part of one process's, the parameter gradients (summed over the ranks) one process's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same weights on every rank
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
    model = LlamaForCausalLM(config).to(torch.float64)
    model.config._attn_implementation = "ahfa"
    ids = torch.randint(0, 96, (B, T), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(T)[None]
    weight = torch.randn(B, T, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    want = model(input_ids=ids, position_ids=positions).logits
    (want * weight).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    with context_parallel(init_device_mesh("cpu", (WORLD,)), buffers=[ids, positions, weight],
                          buffer_seq_dims=[1, 1, 1]):
        logits = model(input_ids=ids, position_ids=positions).logits
        (logits * weight).sum().backward()
    torch.testing.assert_close(logits, shard_sequence(want, rank, WORLD), **TOL)
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, want_grads[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("causal, sparse", [(True, False), (False, False), (True, True)],
                         ids=["causal", "bidirectional", "causal-adaptive-tau1"])
def test_ring_attention_matches_one_process(causal, sparse):
    _spawn(_ring_worker, causal, sparse)


@pytest.mark.parametrize("causal, sparse, backend", [(True, False, None), (False, False, None),
                                                     (True, True, None), (True, False, "triton"),
                                                     (False, True, "triton")],
                         ids=["causal", "bidirectional", "causal-adaptive-tau1", "causal-triton-interpreter",
                              "bidirectional-adaptive-tau1-triton-interpreter"])
def test_attention_inside_torch_context_parallel(causal, sparse, backend):
    _spawn(_engine_worker, causal, sparse, backend)


def test_model_trains_inside_torch_context_parallel():
    _spawn(_model_worker)


def test_speed_script_runs_on_cpu_processes(tmp_path):
    """scripts/context_parallel_speed.py (the multi-GPU measurement) on two CPU processes: its check passes and it
    writes its report."""
    import pathlib

    script = pathlib.Path(__file__).parents[1] / "scripts" / "context_parallel_speed.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(WORLD), str(script), "--out-dir", str(tmp_path), "--seq-lens", "256", "--check-len",
                           "256", "--taus", "0.9", "--rounds", "1", "--layers", "1", "--name", "cp"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "cp.json").read_text())["rows"]
    checks = [r for r in rows if r["what"] == "check"]
    assert len(checks) == 2 and all(r[n] < 1e-5 for r in checks for n in ("out", "lse", "dq", "dk", "dv")), checks
    assert {(r["what"], r["mode"], r["train"]) for r in rows if r["what"] != "check"} == {
        ("attention", m, t) for m in ("exact", "adaptive tau=0.9") for t in (False, True)} | {
        ("model prefill", m, False) for m in ("exact", "adaptive tau=0.9")}
    assert (tmp_path / "cp.md").exists()


def test_fsdp_check_script_runs_on_cpu_processes(tmp_path):
    """scripts/fsdp_check.py (the multi-GPU FSDP check) on one and two CPU processes: the two loss curves agree
    (data-parallel: accelerate has no CPU FSDP, which the record says)."""
    import os
    import pathlib

    script = str(pathlib.Path(__file__).parents[1] / "scripts" / "fsdp_check.py")
    small = ["--layers", "1", "--seq-len", "64", "--steps", "2", "--global-batch", "4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    for cmd in ([sys.executable, script, "--out", str(tmp_path / "one.json"), *small],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), script,
                 "--out", str(tmp_path / "many.json"), "--fsdp", *small]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one, many = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "many"))
    assert many["processes"] == WORLD and many["fsdp"] is False and len(one["losses"]) == 2
    torch.testing.assert_close(many["losses"], one["losses"], rtol=1e-5, atol=0)


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
    with pytest.raises(ValueError, match="ring_step has no gradient"):
        ring_step(q.transpose(1, 2).requires_grad_(), k.transpose(1, 2), v.transpose(1, 2))
    # what torch's engine cannot place on a part of the sequence is refused before any collective
    for kwargs, name in ((dict(window=2, causal=True), "window"), (dict(sinks=torch.zeros(4)), "sinks"),
                         (dict(key_padding_mask=torch.ones(1, 6, dtype=torch.bool)), "key_padding_mask"),
                         (dict(dropout_p=0.1), "dropout_p")):
        with pytest.raises(ValueError, match=f"{name}: not supported inside torch's context_parallel"):
            engine_attention(q, k, v, make_call(q, k, v, **kwargs), None)
    with pytest.raises(ValueError, match="q, k: a causal call inside context_parallel"):
        engine_attention(q, k[:, :4], v[:, :4], make_call(q, k[:, :4], v[:, :4], causal=True), None)


if __name__ == "__main__":  # one rank of _spawn: python test_context_parallel.py WORKER '[rank, port, *args]'
    rank, port, *args = json.loads(sys.argv[2])
    _run_in_group(rank, port, globals()[sys.argv[1]], args)
