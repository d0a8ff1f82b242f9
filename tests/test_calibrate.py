"""Per-layer policies and ``hf_ahfa.calibrate`` (issue 12, item 5): the budget is met on the samples, the
entries are the lowest taus that fit, they are saved with the model, and each layer runs its own entry."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_ahfa
from hf_ahfa.calibrate import _mean_nll
from hf_ahfa.policy import policy_of

TAUS = (0.3, 0.6, 0.9)


def _model(layers=3):
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256, initializer_range=0.2,
        attn_implementation="ahfa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    hf_ahfa.configure(model, block_size=16, stride=8, density_limit=1.0)
    return model


def _samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, 96), generator=g) for _ in range(2)]


def _change(model, samples):
    with hf_ahfa.override(mode="exact", layers=()):
        base = _mean_nll(model, samples)
    return math.exp(_mean_nll(model, samples) - base) - 1.0


@pytest.mark.parametrize("budget", [1e-3, 0.05, 10.0])
def test_calibration_meets_the_budget_with_the_lowest_taus_that_fit(budget):
    model, samples = _model(), _samples()
    result = hf_ahfa.calibrate(model, samples, budget=budget, taus=TAUS, mode="adaptive", progress=False)
    stored = policy_of(model.config).layers
    assert stored == result.layers and all(mode == "adaptive" and tau in TAUS for _, mode, tau in stored)
    # the stored policy, as the model runs it, is within the budget on the samples, as reported
    assert _change(model, samples) == pytest.approx(result.change, abs=1e-9) and abs(result.change) <= budget
    for i, _, tau in stored:  # no lower tau fitted that layer's share alone
        assert all(abs(result.alone[i][t]) > budget / 3 for t in TAUS if t < tau)
    for i in set(range(3)) - {i for i, _, _ in stored}:  # a layer left exact: no tau fitted it
        assert all(abs(change) > budget / 3 for change in result.alone[i].values())
    if budget == 10.0:  # everything fits: every layer at the sparsest tau
        assert stored == tuple((i, "adaptive", TAUS[0]) for i in range(3))
    assert all(len(result.alone[i]) >= 1 for i in range(3))


def test_each_layer_runs_its_own_entry_and_the_entries_are_saved(tmp_path):
    model, samples = _model(), _samples(1)
    hf_ahfa.configure(model, layers=[(1, "adaptive", 0.5)])  # lists, as JSON gives them back
    assert policy_of(model.config).layers == ((1, "adaptive", 0.5),)
    with hf_ahfa.record() as rec, torch.no_grad():
        model(samples[0])
    assert [(r["layer"], r["route"]) for r in rec] == [(0, "sdpa"), (1, "adaptive"), (2, "sdpa")]
    assert rec[0]["reason"] == "mode=exact" and rec[1]["density"] < 1.0
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ahfa").eval()
    assert policy_of(loaded.config) == policy_of(model.config)
    with hf_ahfa.override(layers=()), hf_ahfa.record() as rec, torch.no_grad():
        loaded(samples[0])
    assert {r["route"] for r in rec} == {"sdpa"}
    # a mode (or tau) override wins over the per-layer entries too: what the eval's "ahfa exact" baseline runs
    for fields, routes in (({"mode": "exact"}, {"sdpa"}), ({"tau": 0.5, "mode": "adaptive"}, {"adaptive"})):
        with hf_ahfa.override(**fields), hf_ahfa.record() as rec, torch.no_grad():
            loaded(samples[0])
        assert {r["route"] for r in rec} == routes, fields


def test_entries_hold_up_to_the_calibrated_length():
    """``calibrate`` stores its longest sample as ``layers_max_length``: a context over more keys runs those layers
    as the rest of the policy (exact here), since the budget was measured up to that length only. A limit left
    from an earlier calibration does not cut the new one's measurements short."""
    model, samples = _model(), _samples(2)
    hf_ahfa.configure(model, layers_max_length=32)  # stale: shorter than the new samples
    result = hf_ahfa.calibrate(model, samples, budget=10.0, taus=TAUS, mode="adaptive", progress=False)
    policy = policy_of(model.config)
    assert policy.layers == result.layers and policy.layers_max_length == 96
    assert _change(model, samples) == pytest.approx(result.change, abs=1e-9) and result.change != 0.0
    longer = torch.randint(0, 128, (1, 128), generator=torch.Generator().manual_seed(5))
    for ids, routes in ((samples[0], {"adaptive"}), (longer, {"sdpa"})):
        with hf_ahfa.record() as rec, torch.no_grad():
            model(ids)
        assert {r["route"] for r in rec} == routes, ids.shape
    assert policy.for_layer(0, keys=96).tau == TAUS[0] and policy.for_layer(0, keys=97) is policy
    assert policy.for_layer(0).tau == TAUS[0]  # no length given: the entry


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_layers_max_length_is_validated(value):
    with pytest.raises(ValueError, match="layers_max_length must be an int >= 0"):
        hf_ahfa.AdaptivePolicy(layers_max_length=value)


@pytest.mark.parametrize("layers,match", [
    ([(0, "fast", 0.5)], "mode in"),
    ([(-1, "adaptive", 0.5)], "index >= 0"),
    ([(0, "adaptive", 1.5)], r"tau in \(0, 1\]"),
    ([(0, "adaptive", 0.5), (0, "exact", 1.0)], "twice"),
    ([(0, "adaptive")], "triples"),
])
def test_layer_entries_are_validated(layers, match):
    with pytest.raises(ValueError, match=match):
        hf_ahfa.AdaptivePolicy(layers=layers)


@pytest.mark.parametrize("kw,match", [
    ({"budget": 0.0}, "budget must be > 0"),
    ({"taus": (0.5, 1.0)}, r"taus must be values in \(0, 1\)"),
    ({"mode": "exact"}, "mode must be 'auto' or 'adaptive'"),
    ({"samples": [torch.zeros(1, 20, dtype=torch.long)]}, "at least 2 \\* block_size = 32 tokens"),
    ({"samples": torch.zeros(20, dtype=torch.long)}, r"\(B, T\) tensor"),
])
def test_calibrate_rejects_bad_arguments(kw, match):
    kw = {"samples": _samples(), **kw}
    with pytest.raises(ValueError, match=match):
        hf_ahfa.calibrate(_model(1), kw.pop("samples"), progress=False, **kw)


def test_ahfa_eval_calibrate_end_to_end(tiny_llama, tiny_text, tmp_path, capsys):
    """The command on a tiny Llama (2 layers): windows of the book, results written, the saved model carries
    the settings, and bad input ends with one line."""
    import json

    from hf_ahfa.eval import calibrate as command
    from hf_ahfa.eval import cli

    book = tmp_path / "book.txt"
    book.write_text(tiny_text(3000, 5))
    cli.main(["calibrate", "--model", str(tiny_llama), "--data-files", str(book), "--context-length", "96",
              "--samples", "3", "--block-size", "16", "--budget", "0.05", "--taus", "0.5,0.9", "--mode", "adaptive",
              "--out-dir", str(tmp_path), "--name", "cal", "--save-to", str(tmp_path / "saved")])
    assert "wrote" in capsys.readouterr().out
    data = json.loads((tmp_path / "cal.json").read_text())
    assert data["config"]["samples"] == 3 and {r["layer"] for r in data["rows"]} == {0, 1}
    assert abs(data["change"]) <= 0.05
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="ahfa")
    assert [list(e) for e in policy_of(saved.config).layers] == data["layers"]
    assert "chosen tau" in (tmp_path / "cal.md").read_text()
    windows = command.sample_windows(list(range(100)), 40, 3)
    assert [w[0, 0].item() for w in windows] == [0, 30, 60] and all(w.shape == (1, 40) for w in windows)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["calibrate", "--model", str(tiny_llama), "--data-files", str(book), "--context-length", "100000"])
    assert exit_info.value.code == 2 and "fewer than --context-length" in capsys.readouterr().err


def test_a_model_dequantized_from_gguf_is_saved_with_its_settings(tiny_llama, tmp_path):
    """Transformers refuses save_pretrained on a model loaded with gguf_file= (its quantizer is set, the config
    names the quantization) and Trainer refuses to fine-tune it: ``plain_causal_lm`` (``ahfa-eval calibrate
    --save-to``, ``ahfa-eval train``) copies the weights into a plain model of the same config, the settings
    included. Checked by hand on SmolLM2's GGUF (logits equal) and Gemma-3's (``ahfa-eval train`` on the CPU)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from hf_ahfa.eval.runs import plain_causal_lm, save_causal_lm

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="ahfa").eval()
    hf_ahfa.configure(model, layers=[(1, "adaptive", 0.5)])
    model.hf_quantizer = SimpleNamespace(is_serializable=False)
    model.config.quantization_config = {"quant_method": "gguf"}
    save_causal_lm(model, AutoTokenizer.from_pretrained(tiny_llama), tmp_path / "saved")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="ahfa").eval()
    assert not hasattr(back.config, "quantization_config")
    assert policy_of(back.config).layers == ((1, "adaptive", 0.5),)
    ids = torch.arange(1, 40)[None] % back.config.vocab_size
    with torch.no_grad(), hf_ahfa.override(mode="exact"):
        assert torch.equal(model(ids).logits, back(ids).logits)
    # what `ahfa-eval train` fine-tunes instead (Trainer refuses a GGUF-quantized model): same weights, attention,
    # settings and mode, no quantizer
    plain = plain_causal_lm(model.train())
    assert getattr(plain, "hf_quantizer", None) is None and plain.training
    assert plain.config._attn_implementation == "ahfa" and policy_of(plain.config) == policy_of(model.config)
    with torch.no_grad(), hf_ahfa.override(mode="exact"):
        assert torch.equal(model.eval()(ids).logits, plain.eval()(ids).logits)
    assert plain_causal_lm(plain) is plain
