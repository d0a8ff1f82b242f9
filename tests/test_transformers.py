"""End-to-end tests of ``attn_implementation="ahfa"`` inside Hugging Face Transformers (CPU, fp32).

Every model is built from a tiny seeded config (2-3 layers, hidden 64, 4 query heads, 2 KV heads where the
family has GQA, head_dim 16, vocab 128) with ``from_config`` and compared with the same weights under
``"sdpa"`` and/or ``"eager"``: logits on padded batches (non-padded positions only), greedy generation with
dynamic, static and sliding-window caches, ``output_attentions``, padding-free (flattened) batches, training
gradients (full, LoRA, activation checkpointing, attention dropout), switching implementations at run time,
save/load, and the errors ahfa must raise. Weights are drawn with ``initializer_range=0.2`` (instead of 0.02)
so that attention is far from uniform and masks, windows, softcapping and sinks change the outputs a lot.

Run with ``-s`` to see the max-abs-diff table printed at the end of the module.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorWithFlattening,
    Trainer,
    TrainingArguments,
)

import hf_ahfa
from hf_ahfa import integration, patches

VOCAB = 128
SLIDING_WINDOW = 8  # every padded sequence below is longer than this

# fp32 tolerances. The noise floor between two correct fp32 implementations at these sizes is ~5e-6 on
# logits of magnitude ~5 (sdpa vs eager differ by as much), so the logit check is |a - b| <= 1e-5 + 1e-5 |b|.
LOGIT_ATOL, LOGIT_RTOL = 1e-5, 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4
PROB_ATOL, PROB_RTOL = 1e-6, 1e-5

_DECODER_BASE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.2,
    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=None,
)
_SLIDING_3 = ["sliding_attention", "full_attention", "sliding_attention"]
_ENCODER_BASE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
    max_position_embeddings=64, initializer_range=0.2, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, num_labels=3,
)

CONFIGS = {
    "llama": dict(model_type="llama", **_DECODER_BASE),
    "qwen2": dict(model_type="qwen2", **_DECODER_BASE),
    "qwen3": dict(model_type="qwen3", **_DECODER_BASE),
    "mistral": dict(model_type="mistral", **{**_DECODER_BASE, "sliding_window": SLIDING_WINDOW}),
    # softcap 2.0 is far below the default 50 so that tanh really bends the scores
    "gemma2": dict(model_type="gemma2", **{
        **_DECODER_BASE, "num_hidden_layers": 3, "sliding_window": SLIDING_WINDOW, "layer_types": _SLIDING_3,
        "attn_logit_softcapping": 2.0, "query_pre_attn_scalar": 16,
    }),
    "gemma3_text": dict(model_type="gemma3_text", **{
        **_DECODER_BASE, "num_hidden_layers": 3, "sliding_window": SLIDING_WINDOW, "layer_types": _SLIDING_3,
        "query_pre_attn_scalar": 16,
    }),
    "gpt_oss": dict(model_type="gpt_oss", **{
        **_DECODER_BASE, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
        "sliding_window": SLIDING_WINDOW, "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }),
    # scale_attn_by_inverse_layer_idx makes GPT-2's `scaling` differ from head_dim ** -0.5
    "gpt2": dict(
        model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB,
        initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    ),
    "bert": dict(model_type="bert", **_ENCODER_BASE),
    "roberta": dict(model_type="roberta", **_ENCODER_BASE),
}
DECODERS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "gpt_oss", "gpt2"]
ENCODERS = ["bert", "roberta"]
SLIDING = {"mistral", "gemma2", "gemma3_text", "gpt_oss"}
# Transformers has no sdpa path for these two (softcapping / sinks): eager is their only reference.
NO_SDPA = {"gemma2", "gpt_oss"}


def references(family: str) -> list[str]:
    return ["eager"] if family in NO_SDPA else ["sdpa", "eager"]


def num_layers(model) -> int:
    return model.config.num_hidden_layers


# ----------------------------------------------------------------------------------------------------------
# model and batch builders


def make_config(family: str, **overrides):
    kw = dict(CONFIGS[family])
    model_type = kw.pop("model_type")
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def _init_model(family: str, impl: str, **overrides):
    cls = AutoModelForSequenceClassification if family in ENCODERS else AutoModelForCausalLM
    # A fresh config per model: from_config keeps (and writes _attn_implementation into) the config object it is
    # given, so two models built from one config object would silently share one attention implementation.
    model = cls.from_config(make_config(family, **overrides), attn_implementation=impl)
    if family == "gpt_oss":
        with torch.no_grad():  # sinks start ~N(0, initializer_range): make them matter more
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)
    return model


def make_models(family: str, impls, **overrides) -> dict:
    """One model per implementation, all with the same (seeded) weights, in eval mode."""
    models = {}
    for impl in impls:
        torch.manual_seed(0)
        model = _init_model(family, impl, **overrides)
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict())
        assert model.config._attn_implementation == impl
        models[impl] = model.eval()
    return models


def decoder_batch(padding: str, lengths=(20, 13), seed: int = 0) -> dict:
    """Batch of 2 with different lengths, padded on ``padding`` ("left", "right" or "none")."""
    if padding == "none":
        lengths = (max(lengths),) * 2
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if padding == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids, attention_mask=mask, position_ids=position_ids)


def encoder_batch(family: str, lengths=(12, 7), seed: int = 0) -> dict:
    """Right-padded batch of 2 (RoBERTa derives positions from the pad id, so real tokens avoid it)."""
    pad = make_config(family).pad_token_id
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return dict(input_ids=ids.masked_fill(mask == 0, pad), attention_mask=mask)


# ----------------------------------------------------------------------------------------------------------
# comparison helpers and the report


DIFFS: dict[str, float] = {}
GAPS: dict[str, float] = {}  # smallest top-2 logit gap of the reference over the compared generation steps


@pytest.fixture(scope="module", autouse=True)
def _print_diff_table():
    yield
    if DIFFS:
        width = max(map(len, DIFFS))
        print("\n\nmax |ahfa - reference| (fp32, CPU)")
        for key in sorted(DIFFS):
            print(f"  {key:<{width}}  {DIFFS[key]:.3e}")
    if GAPS:
        width = max(map(len, GAPS))
        print("\nsmallest top-2 logit gap of the reference during greedy generation (ties would be < ~1e-4)")
        for key in sorted(GAPS):
            print(f"  {key:<{width}}  {GAPS[key]:.3e}")


def assert_close(actual, expected, *, atol, rtol, what: str, record: str | None = None) -> float:
    """``|actual - expected| <= atol + rtol * |expected|`` everywhere; the message reports the max abs diff."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the ahfa result"
    diff = (actual.double() - expected.double()).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    if record is not None:
        DIFFS[record] = max(DIFFS.get(record, 0.0), max_abs)
    bad = diff > atol + rtol * expected.double().abs()
    assert not bad.any(), (
        f"{what}: max abs diff {max_abs:.3e} (atol={atol}, rtol={rtol}); {int(bad.sum())} of {diff.numel()} "
        f"elements out of tolerance"
    )
    return max_abs


def assert_grads_close(actual: dict, expected: dict, what: str, record: str | None = None, atol=GRAD_ATOL,
                       rtol=GRAD_RTOL, exact: dict | None = None) -> None:
    """Each gradient of ``actual`` within ``atol``/``rtol`` of ``expected``'s. ``exact``: the float64 gradients of
    the model ``expected`` came from; a parameter outside the tolerance still passes where ``actual`` is no further
    from them than twice ``expected`` is (two float32 implementations of one function can differ by more than a
    fixed tolerance where one of them rounds more, as eager's separate matmul and softmax do on some CPUs)."""
    assert actual.keys() == expected.keys(), f"{what}: different parameters got gradients"
    assert actual, f"{what}: no gradients"
    worst = 0.0
    for name in expected:
        try:
            err = assert_close(actual[name], expected[name], atol=atol, rtol=rtol, what=f"{what}: {name}.grad")
        except AssertionError:
            if exact is None:
                raise
            ours, theirs = ((g[name].double() - exact[name]).abs().max().item() for g in (actual, expected))
            assert ours <= 2 * theirs, (f"{what}: {name}.grad: max error {ours:.3e} against float64, more than twice "
                                        f"the reference's {theirs:.3e}")
            err = (actual[name].double() - expected[name].double()).abs().max().item()
        worst = max(worst, err)
    if record is not None:
        DIFFS[record] = worst


def grads_of(model, batch: dict, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Loss and parameter gradients of one train-mode forward/backward (no optimizer)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def enable_checkpointing(model) -> None:
    """``model.gradient_checkpointing_enable()``, under its Transformers 5 name when it has one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing
    else:
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing


@pytest.fixture
def ahfa_calls(monkeypatch):
    """Counts the attention calls that really ran through hf_ahfa (the router, the memo of plain calls that it
    sent to SDPA before, and the weights path)."""
    calls = {"attention": 0, "probs": 0, "dropout": 0}
    run_call, run_plain, probs = integration.run_call, integration.run_plain, integration.reference_attention_probs

    def counting_plain(*args, **kwargs):
        out = run_plain(*args, **kwargs)
        calls["attention"] += out is not None
        return out

    def counting_run(q, k, v, call, **kwargs):
        calls["attention"] += 1
        calls["dropout"] += call.dropout_p > 0
        return run_call(q, k, v, call, **kwargs)

    def counting_probs(*args, **kwargs):
        calls["probs"] += 1
        return probs(*args, **kwargs)

    monkeypatch.setattr(integration, "run_call", counting_run)
    monkeypatch.setattr(integration, "run_plain", counting_plain)
    monkeypatch.setattr(integration, "reference_attention_probs", counting_probs)
    return calls


def test_registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert hf_ahfa.NAME == "ahfa"
    assert AttentionInterface._global_mapping["ahfa"] is integration.ahfa_attention_forward
    assert "ahfa" in AttentionMaskInterface._global_mapping


# ----------------------------------------------------------------------------------------------------------
# logits


@pytest.mark.parametrize("backend", ["auto", "reference"])  # auto sends plain CPU calls to torch's SDPA
@pytest.mark.parametrize("padding", ["left", "right", "none"])
@pytest.mark.parametrize(
    "family,ref", [(f, r) for f in DECODERS for r in references(f)], ids=lambda x: x
)
def test_decoder_logits_match(family, ref, padding, backend, ahfa_calls, monkeypatch):
    if backend != "auto":
        monkeypatch.setenv("AHFA_BACKEND", backend)
    _decoder_logits_match(family, ref, padding, ahfa_calls)


def _decoder_logits_match(family, ref, padding, ahfa_calls):
    models = make_models(family, ["ahfa", ref])
    batch = decoder_batch(padding)
    with torch.no_grad():
        out = models["ahfa"](**batch).logits
        assert ahfa_calls["attention"] == num_layers(models["ahfa"]), "ahfa did not run in every layer"
        expected = models[ref](**batch).logits
    keep = batch["attention_mask"].bool()
    assert_close(out[keep], expected[keep], atol=LOGIT_ATOL, rtol=LOGIT_RTOL,
                 what=f"{family} logits ({padding} padding) vs {ref}", record=f"logits {family} {padding} vs {ref}")


@pytest.mark.parametrize("family", DECODERS)
def test_left_padded_rows_match_unpadded_runs(family):
    """Padding never leaks: each row of a left-padded batch equals the sequence run alone."""
    model = make_models(family, ["ahfa"])["ahfa"]
    batch = decoder_batch("left")
    with torch.no_grad():
        padded = model(**batch).logits
        for b in range(2):
            keep = batch["attention_mask"][b].bool()
            alone = model(input_ids=batch["input_ids"][b, keep][None]).logits[0]
            assert_close(padded[b, keep], alone, atol=LOGIT_ATOL, rtol=LOGIT_RTOL,
                         what=f"{family} row {b} padded vs alone", record=f"padded-vs-alone {family}")


@pytest.mark.parametrize("ref", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_logits_match(family, ref, ahfa_calls):
    models = make_models(family, ["ahfa", ref])
    batch = encoder_batch(family)
    with torch.no_grad():
        out = models["ahfa"](**batch, output_hidden_states=True)
        assert ahfa_calls["attention"] == num_layers(models["ahfa"])
        expected = models[ref](**batch, output_hidden_states=True)
    keep = batch["attention_mask"].bool()
    assert_close(out.logits, expected.logits, atol=LOGIT_ATOL, rtol=LOGIT_RTOL,
                 what=f"{family} classifier logits vs {ref}", record=f"logits {family} right vs {ref}")
    assert_close(out.hidden_states[-1][keep], expected.hidden_states[-1][keep], atol=LOGIT_ATOL,
                 rtol=LOGIT_RTOL, what=f"{family} last hidden state vs {ref}",
                 record=f"hidden {family} right vs {ref}")


# ----------------------------------------------------------------------------------------------------------
# greedy generation


def assert_same_greedy(out, ref, prompt_len: int, what: str, min_steps: int) -> int:
    """Greedy outputs of ahfa (``out``) and the reference agree; returns the number of steps compared.

    Random-weight models can put two logits within fp32 noise of each other, and then two correct attention
    implementations may legitimately pick different argmaxes, after which their continuations differ. So the
    check is: at every step the logits must match to LOGIT_ATOL/RTOL (both models were fed the same tokens so
    far), and the chosen tokens must be identical, unless the reference's top-2 gap at that step is itself
    within tolerance (a genuine tie); only then does the comparison stop early. The seeds and
    ``initializer_range=0.2`` (plus untied lm_heads) give top-2 gaps far above the noise, so in practice all
    steps are compared; ``min_steps`` makes sure a tie can never hollow the test out.
    """
    steps = len(ref.logits)
    assert len(out.logits) == steps
    for t in range(steps):
        la, lr = out.logits[t], ref.logits[t]
        assert_close(la, lr, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, what=f"{what}: step {t} logits", record=what)
        top2 = lr.topk(2, dim=-1).values
        GAPS[what] = min(GAPS.get(what, math.inf), (top2[:, 0] - top2[:, 1]).min().item())
        ta, tr = out.sequences[:, prompt_len + t], ref.sequences[:, prompt_len + t]
        if not torch.equal(ta, tr):
            gap = top2[:, 0] - top2[:, 1]
            tie_tol = 2 * (LOGIT_ATOL + LOGIT_RTOL * top2[:, 0].abs())
            rows = (ta != tr).nonzero().flatten()
            assert (gap[rows] <= tie_tol[rows]).all(), (
                f"{what}: step {t} tokens differ ({ta.tolist()} vs {tr.tolist()}) although the reference's top-2 "
                f"gap is {gap[rows].tolist()} (not a tie)"
            )
            assert t >= min_steps, f"{what}: a near-tie at step {t} leaves too few steps compared; pick another seed"
            return t
    assert torch.equal(out.sequences, ref.sequences), f"{what}: sequences differ"
    return steps


_EXPECTED_CACHE_LAYERS = {
    (None, False): {"DynamicLayer"},
    (None, True): {"DynamicSlidingWindowLayer"},
    ("static", False): {"StaticLayer"},
    ("static", True): {"StaticSlidingWindowLayer"},
}


@pytest.mark.parametrize(
    "cache,prompts", [(None, "left"), ("static", "left"), ("static", "none")],
    ids=["dynamic-leftpad", "static-leftpad", "static-nopad"],
)
@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generate_matches(family, cache, prompts, ahfa_calls):
    """Prompts of 10 and 6 tokens + 12 new tokens: longer than the sliding window (8) on both rows.

    "static-nopad" exercises the prefill where Transformers skips the mask (``is_causal``) while the static
    cache hands ahfa more key slots than queries.
    """
    _greedy_generate_matches(family, cache, prompts, ahfa_calls)


def _greedy_generate_matches(family, cache, prompts, ahfa_calls):
    ref_impl = references(family)[0]
    models = make_models(family, ["ahfa", ref_impl])
    batch = decoder_batch(prompts, lengths=(10, 6), seed=1)
    del batch["position_ids"]  # generate derives them from the attention mask
    kwargs = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0)
    if cache is not None:
        kwargs["cache_implementation"] = cache
    outs = {}
    for impl, model in models.items():
        outs[impl] = model.generate(**batch, **kwargs)
        layer_types = {type(layer).__name__ for layer in outs[impl].past_key_values.layers}
        # the sliding families must really run with sliding-window cache layers (and full layers where mixed)
        expected = _EXPECTED_CACHE_LAYERS[(cache, family in SLIDING)]
        assert expected <= layer_types, f"{family}/{impl}: cache layers {layer_types}, expected {expected}"
    assert ahfa_calls["attention"] >= 12 * num_layers(models["ahfa"])
    prompt_len = batch["input_ids"].shape[1]
    assert prompt_len + 12 > SLIDING_WINDOW and 6 + 12 > SLIDING_WINDOW
    what = f"generate {family} {cache or 'dynamic'} {prompts} vs {ref_impl}"
    assert_same_greedy(outs["ahfa"], outs[ref_impl], prompt_len, what, min_steps=8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", DECODERS)
def test_padding_vector_prefill_matches(family, padding, backend, padding_vectors, ahfa_calls, monkeypatch):
    # the padded prefill runs causal (and windowed, softcapped, with sinks) attention with a key-padding mask
    # instead of the dense mask: the same logits at every real position
    monkeypatch.setenv("AHFA_BACKEND", backend)
    _decoder_logits_match(family, "eager", padding, ahfa_calls)
    assert padding_vectors and all(kpm and not dense for kpm, dense, _ in padding_vectors), padding_vectors


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_padding_vector_generate_and_grads_match(family, padding_vectors, ahfa_calls):
    _greedy_generate_matches(family, None, "left", ahfa_calls)
    assert (True, False, False) in padding_vectors  # the prefill
    assert (True, False, True) in padding_vectors  # a decode step's one-row mask read as key padding
    models = make_models(family, ["ahfa", "eager"])
    loss_a, grads_a = grads_of(models["ahfa"], train_batch(family))
    loss_e, grads_e = grads_of(models["eager"], train_batch(family))
    assert_close(loss_a, loss_e, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, what=f"{family} loss, padding vector")
    assert_grads_close(grads_a, grads_e, f"{family} grads vs eager, padding vector")


def test_a_prompt_without_padding_gets_no_mask(padding_vectors):
    # generate()'s all-ones mask: no padding vector (a masked kernel) but no mask at all, as sdpa_mask decides, so
    # that the prefill runs causal SDPA on the plain path (record() makes every call take the full path). Newer
    # Transformers drop the all-ones mask before the mask function; 5.17 (the lowest) passes it on.
    model = make_models("llama", ["ahfa"])["ahfa"]
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0)).to(model.device)
    with hf_ahfa.record():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    prefill = [(kpm, dense) for kpm, dense, one_row in padding_vectors if not one_row]
    assert len(prefill) == num_layers(model) and not any(kpm or dense for kpm, dense in prefill), prefill


def test_padding_vector_only_where_it_is_exact(padding_vectors, ahfa_calls):
    # a static cache's prefill (more key slots than queries) keeps the dense mask; its decode steps' one-row masks
    # are key padding (the cache's empty tail then outside the span the decode kernel reads)
    _greedy_generate_matches("llama", "static", "left", ahfa_calls)
    prefill = [(kpm, dense) for kpm, dense, one_row in padding_vectors if not one_row]
    decode = [(kpm, dense) for kpm, dense, one_row in padding_vectors if one_row]
    assert prefill and all(dense and not kpm for kpm, dense in prefill), prefill
    assert decode and all(kpm and not dense for kpm, dense in decode), decode


# ----------------------------------------------------------------------------------------------------------
# output_attentions


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt_oss", "bert"])
def test_output_attentions_match_eager(family, ahfa_calls):
    models = make_models(family, ["ahfa", "eager"])
    if family in ENCODERS:
        batch = encoder_batch(family)
    else:
        batch = decoder_batch("left")
    with torch.no_grad():
        out = models["ahfa"](**batch, output_attentions=True)
        expected = models["eager"](**batch, output_attentions=True)
    n = num_layers(models["ahfa"])
    assert ahfa_calls["probs"] == n, "ahfa did not compute the attention weights itself"
    assert len(out.attentions) == len(expected.attentions) == n
    keep = batch["attention_mask"].bool()
    for layer, (wa, we) in enumerate(zip(out.attentions, expected.attentions)):
        assert wa is not None and wa.shape == we.shape
        # rows of padded queries are meaningless (eager: uniform over masked keys; ahfa: zeros): skip them
        for b in range(2):
            assert_close(wa[b][:, keep[b]], we[b][:, keep[b]], atol=PROB_ATOL, rtol=PROB_RTOL,
                         what=f"{family} layer {layer} row {b} attention weights", record=f"weights {family}")
            rows = wa[b][:, keep[b]].sum(-1)
            if family != "gpt_oss":  # the sinks take part of the mass
                assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    # the logits are unchanged by asking for the weights
    assert_close(out.logits[keep] if family not in ENCODERS else out.logits,
                 expected.logits[keep] if family not in ENCODERS else expected.logits,
                 atol=LOGIT_ATOL, rtol=LOGIT_RTOL, what=f"{family} logits with output_attentions")


def test_output_attentions_gpt2_matches_eager():
    models = make_models("gpt2", ["ahfa", "eager"])
    batch = decoder_batch("left")
    with torch.no_grad():
        out = models["ahfa"](**batch, output_attentions=True)
        expected = models["eager"](**batch, output_attentions=True)
    assert len(out.attentions) == len(expected.attentions) == 2
    keep = batch["attention_mask"].bool()
    for wa, we in zip(out.attentions, expected.attentions):
        for b in range(2):
            assert_close(wa[b][:, keep[b]], we[b][:, keep[b]], atol=PROB_ATOL, rtol=PROB_RTOL, what="gpt2 weights")


def test_output_attentions_static_cache_prefill_matches_eager():
    models = make_models("llama", ["ahfa", "eager"])
    batch = decoder_batch("none", lengths=(10, 10))
    del batch["position_ids"]
    kwargs = dict(max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True,
                  cache_implementation="static", pad_token_id=0)
    out = models["ahfa"].generate(**batch, **kwargs)
    expected = models["eager"].generate(**batch, **kwargs)
    for step, (sa, se) in enumerate(zip(out.attentions, expected.attentions)):
        for layer, (wa, we) in enumerate(zip(sa, se)):
            assert_close(wa, we, atol=PROB_ATOL, rtol=PROB_RTOL, what=f"step {step} layer {layer} weights")


# ----------------------------------------------------------------------------------------------------------
# padding-free (flattened) batches


@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["cu_seq_lens", "position_ids"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_flattened_batch_matches_separate_sequences(family, flash_kwargs, ahfa_calls):
    model = make_models(family, ["ahfa"])["ahfa"]
    g = torch.Generator(torch.get_default_device()).manual_seed(2)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 11, 5)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": s} for s in seqs])
    batch.pop("labels")
    assert ("cu_seq_lens_q" in batch) == flash_kwargs and "attention_mask" not in batch
    with torch.no_grad():
        separate = torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in seqs])
        # Transformers derives the packed-sequence mask from position_ids only when no cache is passed
        # (training); with cu_seq_lens ahfa needs no mask at all, so that variant also runs with the
        # default eval-mode DynamicCache (Transformers then skips the mask and only cu_seq_lens separates).
        for use_cache in ([False, True] if flash_kwargs else [False]):
            ahfa_calls["attention"] = 0
            packed = model(**batch, use_cache=use_cache).logits[0]
            assert ahfa_calls["attention"] == num_layers(model)
            assert_close(packed, separate, atol=LOGIT_ATOL, rtol=LOGIT_RTOL,
                         what=f"{family} flattened ({'cu_seq_lens' if flash_kwargs else 'position_ids'}, "
                              f"use_cache={use_cache}) vs separate",
                         record=f"flattened {family} {'cu_seq_lens' if flash_kwargs else 'position_ids'}")


# ----------------------------------------------------------------------------------------------------------
# training


def train_batch(family: str, seed: int = 0) -> dict:
    if family in ENCODERS:
        return dict(**encoder_batch(family, seed=seed), labels=torch.tensor([0, 2]))
    batch = decoder_batch("right", lengths=(12, 9), seed=seed)
    del batch["position_ids"]
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


class TinyDataset(torch.utils.data.Dataset):
    """4 examples (2 Trainer batches) of the shapes of ``train_batch``, padded already (default collator)."""

    def __init__(self, family: str):
        self.items = []
        for seed in (10, 11):
            batch = train_batch(family, seed=seed)
            self.items += [{k: v[b] for k, v in batch.items()} for b in range(2)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def training_args(path, **kw):
    return TrainingArguments(
        output_dir=str(path), max_steps=1, per_device_train_batch_size=2, report_to=[],
        use_cpu=not torch.cuda.is_available(), save_strategy="no", logging_steps=1, disable_tqdm=True,
        # the items may already live on the GPU (AHFA_TEST_DEVICE=cuda): nothing to pin
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=0, **kw,
    )


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_trainer_step_and_grads_match_eager(family, tmp_path, ahfa_calls):
    # 1. one optimizer-free backward pass on the same batch: ahfa's gradients are eager's
    models = make_models(family, ["ahfa", "eager"])
    start = {k: v.clone() for k, v in models["ahfa"].state_dict().items()}
    batch = train_batch(family)
    loss_a, grads_a = grads_of(models["ahfa"], batch)
    loss_e, grads_e = grads_of(models["eager"], batch)
    _, grads_exact = grads_of(copy.deepcopy(models["eager"]).double(), batch)
    assert ahfa_calls["attention"] == num_layers(models["ahfa"])
    assert torch.isfinite(loss_a)
    assert_close(loss_a, loss_e, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, what=f"{family} loss")
    assert len(grads_a) == len(list(models["ahfa"].parameters())), "some parameters got no gradient"
    assert_grads_close(grads_a, grads_e, f"{family} grads vs eager", record=f"grads {family} vs eager",
                       exact=grads_exact)

    # 2. one Trainer step (SGD, so that the update is linear in the gradient) with each implementation
    results = {}
    for impl, model in models.items():
        model.load_state_dict(start)
        out = Trainer(model=model, args=training_args(tmp_path / impl, optim="sgd", learning_rate=0.1),
                      train_dataset=TinyDataset(family)).train()
        results[impl] = out.training_loss
    assert math.isfinite(results["ahfa"])
    assert abs(results["ahfa"] - results["eager"]) <= 1e-5 * (1 + abs(results["eager"])), results
    deltas = {impl: {n: p.detach() - start[n] for n, p in m.named_parameters()} for impl, m in models.items()}
    assert max(d.abs().max().item() for d in deltas["ahfa"].values()) > 1e-4, "the Trainer step did not move"
    # the SGD update is lr * (clipped) gradient: ahfa's must be eager's (atol: a few fp32 ulps of weights ~1,
    # which is all that p_after - p_before can resolve)
    for name, delta in deltas["ahfa"].items():
        assert_close(delta, deltas["eager"][name], atol=5e-7, rtol=GRAD_RTOL,
                     what=f"{family} update of {name} in one Trainer step", record=f"trainer update {family} vs eager")


@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "v_proj"]), ("bert", ["query", "value"])])
def test_peft_lora_step_and_grads_match_eager(family, targets, tmp_path):
    from peft import LoraConfig, get_peft_model

    models = make_models(family, ["ahfa", "eager"])
    peft_models = {}
    for impl, base in models.items():
        torch.manual_seed(1)
        # init_lora_weights=False: random B as well as A, so that lora_A gets a non-zero gradient too
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
        peft_models[impl] = get_peft_model(base, lora)
    peft_models["eager"].load_state_dict(peft_models["ahfa"].state_dict())
    assert peft_models["ahfa"].base_model.model.config._attn_implementation == "ahfa"

    batch = train_batch(family)
    loss_a, grads_a = grads_of(peft_models["ahfa"], batch)
    loss_e, grads_e = grads_of(peft_models["eager"], batch)
    assert torch.isfinite(loss_a)
    n_targets = len(targets) * num_layers(models["ahfa"])
    assert set(grads_a) == {n for n, p in peft_models["ahfa"].named_parameters() if p.requires_grad}
    assert len(grads_a) == 2 * n_targets and all("lora_" in n for n in grads_a)
    assert all(g.abs().max() > 0 for g in grads_a.values()), "a LoRA matrix got an all-zero gradient"
    assert_grads_close(grads_a, grads_e, f"{family} LoRA grads vs eager", record=f"lora grads {family} vs eager")

    # one LoRA Trainer step with ahfa: finite loss, LoRA weights move, the frozen base does not
    model = peft_models["ahfa"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = Trainer(model=model, args=training_args(tmp_path, learning_rate=1e-2),
                  train_dataset=TinyDataset(family)).train()
    assert math.isfinite(out.training_loss)
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == p.requires_grad, f"{n}: changed={changed}, trainable={p.requires_grad}"


@pytest.mark.parametrize("family,baseline", [("llama", "sdpa"), ("gemma2", "eager")])
def test_mixed_precision_autocast_matches_the_baseline(family, baseline, tmp_path):
    # float32 weights under bf16 autocast (Trainer's bf16=True, ahfa-eval train on CUDA): rotary embeddings leave
    # q, k in float32 beside a bf16 v, which the attention must take as sdpa does (in autocast's dtype)
    models = make_models(family, ["ahfa", baseline])
    batch = train_batch(family)
    device = torch.empty(0).device.type
    runs = {}
    for impl, model in models.items():
        with torch.autocast(device, dtype=torch.bfloat16):
            runs[impl] = grads_of(model, batch)
    exact_loss, exact = grads_of(copy.deepcopy(models[baseline]).double(), batch)
    # bf16 rounding on both sides: ahfa may be no further from the float64 model than twice the baseline is
    checks = [("loss", runs["ahfa"][0], runs[baseline][0], exact_loss)]
    checks += [(f"{n}.grad", runs["ahfa"][1][n], runs[baseline][1][n], g) for n, g in exact.items()]
    for what, ahfa, base, truth in checks:
        err, base_err = ((x.double() - truth).abs().max().item() for x in (ahfa, base))
        assert err <= 2 * base_err + 1e-6 * truth.abs().max().item(), f"{family} {what}: {err} vs {baseline} {base_err}"

    # one Trainer step in bf16 mixed precision (the configuration that failed on a GPU)
    model = models["ahfa"]
    out = Trainer(model=model, args=training_args(tmp_path, bf16=True, learning_rate=1e-2),
                  train_dataset=TinyDataset(family)).train()
    assert math.isfinite(out.training_loss)


@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_gradient_checkpointing_grads_equal(family, ahfa_calls):
    model = make_models(family, ["ahfa"])["ahfa"]
    batch = train_batch(family)
    loss, grads = grads_of(model, batch)
    n = num_layers(model)
    assert ahfa_calls["attention"] == n
    enable_checkpointing(model)
    loss_ckpt, grads_ckpt = grads_of(model, batch)
    # every layer ran twice: once in the forward, once recomputed in the backward
    assert ahfa_calls["attention"] == n + 2 * n
    assert_close(loss_ckpt, loss, atol=0, rtol=1e-6, what=f"{family} loss with checkpointing")
    assert_grads_close(grads_ckpt, grads, f"{family} grads with checkpointing",
                       record=f"checkpointing grads {family}")


def test_attention_dropout_with_gradient_checkpointing(ahfa_calls):
    model = make_models("llama", ["ahfa"], attention_dropout=0.1)["ahfa"]
    batch = train_batch("llama")
    _, grads = grads_of(model, batch, seed=1)
    _, grads_other_seed = grads_of(model, batch, seed=2)
    assert ahfa_calls["dropout"] == 2 * num_layers(model), "ahfa's attention dropout was not used"
    # dropout is really on: another seed gives other gradients
    assert any(not torch.allclose(grads[k], grads_other_seed[k]) for k in grads)
    enable_checkpointing(model)
    _, grads_ckpt = grads_of(model, batch, seed=1)
    assert ahfa_calls["dropout"] == 2 * num_layers(model) + 2 * num_layers(model)  # forward + recompute
    # checkpointing restores torch's RNG state before recomputing, and ahfa draws its mask from that RNG
    assert_grads_close(grads_ckpt, grads, "llama dropout=0.1 grads with checkpointing",
                       record="checkpointing grads llama dropout=0.1")
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits
    assert torch.equal(a, b), "dropout must be off in eval mode"


# ----------------------------------------------------------------------------------------------------------
# switching, loading, saving


@pytest.mark.parametrize("family,base", [("llama", "sdpa"), ("llama", "eager"), ("gemma2", "eager")])
def test_set_attn_implementation_at_runtime(family, base, ahfa_calls):
    model = make_models(family, [base])[base]
    batch = decoder_batch("left")
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**batch).logits
        model.set_attn_implementation("ahfa")
        assert model.config._attn_implementation == "ahfa"
        switched = model(**batch).logits
        assert ahfa_calls["attention"] == num_layers(model)
        assert_close(switched[keep], expected[keep], atol=LOGIT_ATOL, rtol=LOGIT_RTOL,
                     what=f"{family} after set_attn_implementation('ahfa') vs {base}")
        model.set_attn_implementation(base)
        assert model.config._attn_implementation == base
        back = model(**batch).logits
        assert ahfa_calls["attention"] == num_layers(model), "ahfa still ran after switching back"
        assert torch.equal(back, expected)


def test_from_config_save_and_from_pretrained_round_trip(tmp_path, ahfa_calls):
    model = make_models("llama", ["ahfa"])["ahfa"]
    batch = decoder_batch("left")
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ahfa").eval()
    assert loaded.config._attn_implementation == "ahfa"
    for (n, p), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    ahfa_calls["attention"] = 0
    with torch.no_grad():
        out = loaded(**batch).logits
    assert ahfa_calls["attention"] == num_layers(loaded)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------------------
# errors

# Models with their own attention code in some Transformers releases. Whether one still bypasses the
# AttentionInterface is read off the installed release's class (GPT-J and CodeGen moved to the interface in
# 5.24), so this test holds on every release the package allows.
OWN_ATTENTION_CONFIGS = {
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "mpt": dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=64),
    "codegen": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, n_ctx=64),
    "gpt_neo": dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                    window_size=8, max_position_embeddings=64),
    # no patch for these two (own attention code in 5.17 and 5.25): the guard's refusal stays exercised
    "openai-gpt": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox_japanese": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_multiple_size=2,
                              max_position_embeddings=64),
}


def _own_attention_config(model_type):
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, **OWN_ATTENTION_CONFIGS[model_type])


def _bypasses_interface(model_type) -> bool:
    cls = AutoModelForCausalLM._model_mapping[type(_own_attention_config(model_type))]
    return not getattr(cls, "_supports_attention_backend", False)


def test_some_listed_model_still_bypasses_the_interface():
    # the guard below must be exercised on a real model of the installed release, not only by name
    assert any(_bypasses_interface(m) and not _patched(m) for m in OWN_ATTENTION_CONFIGS), \
        "no listed unpatched model bypasses the interface"


def _patched(model_type) -> bool:
    """Whether hf_ahfa.patches runs this model type on the installed release."""
    return patches.apply(model_type, _own_attention_config(model_type))


@pytest.mark.parametrize("model_type", sorted(OWN_ATTENTION_CONFIGS))
def test_models_with_own_attention_raise_or_run_exactly(model_type, tmp_path, ahfa_calls):
    """A model that bypasses the interface without a patch in hf_ahfa.patches must refuse ahfa; one that moved
    to the interface, or has a patch, must run ahfa exactly."""
    if _bypasses_interface(model_type) and not _patched(model_type):
        _assert_refuses_ahfa(model_type, tmp_path)
    else:
        _assert_runs_ahfa_like_eager(model_type, ahfa_calls)


def _assert_refuses_ahfa(model_type, tmp_path):
    with pytest.raises(ValueError, match=f"ahfa.*'{model_type}'"):
        AutoModelForCausalLM.from_config(_own_attention_config(model_type), attn_implementation="ahfa")
    eager = AutoModelForCausalLM.from_config(_own_attention_config(model_type), attn_implementation="eager")
    eager.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"ahfa.*'{model_type}'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ahfa")
    # switching at run time: depending on the release and model, Transformers refuses with a warning or lets our
    # guard raise; either way the model must not claim ahfa
    try:
        eager.set_attn_implementation("ahfa")
    except ValueError as err:
        assert f"'{model_type}'" in str(err)
    assert eager.config._attn_implementation != "ahfa"


def _assert_runs_ahfa_like_eager(model_type, ahfa_calls):
    models = {}
    for impl in ("eager", "ahfa"):
        torch.manual_seed(0)
        models[impl] = AutoModelForCausalLM.from_config(_own_attention_config(model_type),
                                                        attn_implementation=impl).eval()
    models["ahfa"].load_state_dict(models["eager"].state_dict())
    batch = decoder_batch("left")
    ahfa_calls["attention"] = 0
    with torch.no_grad():
        expected = models["eager"](**batch).logits
        out = models["ahfa"](**batch).logits
    assert ahfa_calls["attention"] == 2, "ahfa did not run every layer"
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], expected[real], atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


def _tiny_attention_call():
    model = make_models("llama", ["ahfa"])["ahfa"]
    module = model.model.layers[0].self_attn
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    q = torch.randn(1, 4, 5, 16, generator=g)
    k = torch.randn(1, 2, 5, 16, generator=g)
    v = torch.randn(1, 2, 5, 16, generator=g)
    return module, q, k, v


@pytest.mark.parametrize("name", ["position_bias", "alibi"])
def test_unsupported_semantic_kwarg_raises(name):
    module, q, k, v = _tiny_attention_call()
    with pytest.raises(TypeError, match=name):
        integration.ahfa_attention_forward(module, q, k, v, None, **{name: torch.zeros(1, 4, 5, 5)})


def test_ignored_kwargs_and_float_masks():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module, q, k, v = _tiny_attention_call()
    bookkeeping = dict(position_ids=torch.arange(5)[None], cache_position=torch.arange(5), use_cache=True,
                       position_bias=None)
    out, weights = integration.ahfa_attention_forward(module, q, k, v, None, scaling=0.25, **bookkeeping)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    assert weights is None
    assert_close(out, expected, atol=1e-6, rtol=1e-5, what="direct call vs sdpa_attention_forward")

    visible = torch.ones(5, 5, dtype=torch.bool).tril()
    visible[3, 1] = False
    bool_mask = visible[None, None]
    float_mask = torch.zeros(1, 1, 5, 5).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    out_bool, _ = integration.ahfa_attention_forward(module, q, k, v, bool_mask, scaling=0.25)
    out_float, _ = integration.ahfa_attention_forward(module, q, k, v, float_mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, q, k, v, bool_mask, scaling=0.25)
    assert_close(out_bool, expected, atol=1e-6, rtol=1e-5, what="bool mask vs sdpa")
    assert torch.equal(out_bool, out_float)
    with pytest.raises(ValueError, match="additive"):
        integration.ahfa_attention_forward(module, q, k, v, float_mask + 0.5, scaling=0.25)
