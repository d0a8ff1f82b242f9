"""Whole-model ``torch.compile(fullgraph=True)`` with ahfa: exact and adaptive policies, and Transformers'
compiled static-cache ``generate``. CPU runs Dynamo with the ``eager`` backend (what breaks ``fullgraph`` is
tracing, not code generation); the GPU run (``-m gpu``) uses inductor."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation import CompileConfig

import hf_ahfa

BACKEND = "inductor" if torch.cuda.is_available() else "eager"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model():
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                               max_position_embeddings=256, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="ahfa").to(DEVICE).eval()


def test_the_router_offers_no_installed_kernel_while_tracing():
    # on CUDA the router asks hf_ahfa.installed for flash-attn candidates, whose first call imports them: a
    # compiled model's first call reached that import inside the trace (Dynamo refuses to trace importlib)
    from hf_ahfa import installed
    from hf_ahfa.spec import plain_call

    installed.modules.cache_clear()
    call = plain_call(8, 8, 16, causal=True, window=None, scale=None)
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    torch._dynamo.reset()
    traced = torch.compile(lambda t: t * (1 + len(installed.candidates(t, t, t, call, False))), fullgraph=True,
                           backend="eager")
    torch.testing.assert_close(traced(q), q)


def test_nothing_is_timed_while_tracing_where_cuda_is_available(monkeypatch):
    # Dynamo cannot trace the test that a CUDA graph is being captured: on CUDA a compiled model's first call
    # failed in it (host_may_wait: the router's timing, ahfa_mask's all-ones test); tracing must answer first
    from hf_ahfa import fastest

    def capturing():  # (on CUDA torch's own function, which Dynamo refuses, as it refuses this raise)
        raise RuntimeError("the capture test was traced")

    monkeypatch.setattr(fastest, "cuda_graph_capturing", capturing)
    torch._dynamo.reset()
    traced = torch.compile(lambda t: t + 1 if fastest.host_may_wait() else t - 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(traced(torch.zeros(2)), -torch.ones(2))


@pytest.mark.parametrize("policy", [dict(mode="exact"), dict(mode="adaptive", block_size=16, stride=8, tau=0.9)])
def test_fullgraph_compile_matches_eager(policy):
    torch._dynamo.reset()
    model = _model()
    hf_ahfa.configure(model, **policy)
    ids = torch.randint(1, 128, (2, 64), device=DEVICE)
    mask = torch.ones_like(ids)
    if policy["mode"] == "exact":
        mask[1, :9] = 0  # padding: a dense mask through the compiled graph
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = torch.compile(model, fullgraph=True, backend=BACKEND)(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fullgraph_compile_of_a_training_step_under_autocast():
    # mixed precision: the attention function's own autocast handling (q, k, v to bf16, its arithmetic outside
    # autocast) traces without a graph break, forward and backward
    torch._dynamo.reset()
    model = _model().train()
    ids = torch.randint(1, 128, (2, 48), device=DEVICE)
    losses = {}
    for name, fn in (("eager", model), ("compiled", torch.compile(model, fullgraph=True, backend=BACKEND))):
        model.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = fn(ids, labels=ids).loss
        loss.backward()
        losses[name] = (loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    (loss, grad), (want_loss, want_grad) = losses["compiled"], losses["eager"]
    if BACKEND == "eager":  # Dynamo's trace runs the same operations: the same bits
        assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    else:  # inductor fuses the bf16 operations around the attention: their roundings, a few bf16 ulps
        torch.testing.assert_close(loss, want_loss, atol=0, rtol=2e-2)
        torch.testing.assert_close(grad, want_grad, atol=2e-2 * want_grad.abs().max().item(), rtol=2e-2)


def test_compiled_static_cache_generate():
    torch._dynamo.reset()
    model = _model()
    ids = torch.randint(1, 128, (2, 12), device=DEVICE)
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    want = model.generate(ids, **kw)
    compile_config = CompileConfig(fullgraph=True, backend=BACKEND)
    compile_config._compile_all_devices = True  # Transformers compiles decode steps on accelerators only by default
    got = model.generate(ids, compile_config=compile_config, **kw)
    assert torch.equal(got, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "generate did not compile the decode step"


def test_per_layer_policy_under_fullgraph_compile():
    policy = hf_ahfa.AdaptivePolicy(mode="exact", layers=((1, "adaptive", 0.9),))

    @torch.compile(fullgraph=True, backend="eager")  # the policy's branch is traced: no code generation needed
    def scaled(x, layer):
        p = policy.for_layer(layer)
        return x * p.tau if p.mode == "adaptive" else x

    assert torch.allclose(scaled(torch.ones(2), 1), torch.full((2,), 0.9))
    assert torch.equal(scaled(torch.ones(2), 0), torch.ones(2))
    assert "_by_layer" not in policy.__dict__  # tracing built no cache
    assert policy.for_layer(1).tau == 0.9 and "_by_layer" in policy.__dict__
