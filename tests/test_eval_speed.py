"""The speed report (CPU): FLOP counts, ratios and the files written from benchmark rows."""

from __future__ import annotations

import json

from hf_ahfa.eval.speed import Row, attention_flops, ratios
from hf_ahfa.eval.speed_report import write_speed_report


def _row(provider, ms, T=4096, causal=True, mode="fwd"):
    flops = attention_flops(8, 32, T, T, 128, causal, mode)
    return Row("prefill", provider, mode, causal, 8, 32, 32, T, T, 128, ms, ms * 0.9, ms * 1.1,
               tflops=flops / ms / 1e9).__dict__


def test_flops_follow_the_convention():
    full = attention_flops(2, 4, 100, 200, 64, False, "fwd")
    assert full == 4 * 2 * 4 * 100 * 200 * 64
    assert attention_flops(2, 4, 100, 200, 64, True, "fwd") == full / 2
    assert attention_flops(2, 4, 100, 200, 64, False, "fwd+bwd") == full * 3.5


def test_ratios_pair_same_shapes_only():
    rows = [_row("ahfa", 2.0), _row("sdpa-cudnn", 3.0), _row("ahfa", 5.0, T=8192)]
    assert ratios(rows, "sdpa-cudnn") == {("prefill", "fwd", True, 4096, 4096, 128): 1.5}


def test_report_files(tmp_path):
    rows = [_row("ahfa", 2.0), _row("sdpa-cudnn", 3.0), _row("ahfa", 4.0, mode="fwd+bwd"),
            _row("sdpa-cudnn", 3.0, mode="fwd+bwd")]
    rows.append({**_row("flex", 1.0), "ms": None, "tflops": None, "error": "RuntimeError: no kernel"})
    paths = write_speed_report(rows, tmp_path, "unit")
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["torch"] and len(data["rows"]) == 5
    assert data["ahfa_speedup"]["sdpa-cudnn"] == {"prefill/fwd/True/4096/4096/128": 1.5,
                                                   "prefill/fwd+bwd/True/4096/4096/128": 0.75}
    md = paths["md"].read_text()
    assert "1.50x" in md and "0.75x" in md and "flex fwd T=4096 D=128: RuntimeError: no kernel" in md
    assert paths["png"].stat().st_size > 10_000


def test_complexity_analyzer_counts():
    from transformers import AutoConfig

    from hf_ahfa.eval.model_speed import predict

    cfg = AutoConfig.for_model("gemma3_text", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                               head_dim=8, hidden_size=32, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"])
    L = 10
    sliding_pairs = L * 4 - 4 * 3 // 2  # each query sees at most 4 keys
    full_pairs = L * (L + 1) // 2
    got = predict(cfg, L, 2, "ahfa")
    assert got["attn_flops"] == 4 * 4 * 8 * (sliding_pairs + full_pairs)
    assert got["attn_extra_memory"] == 0
    assert predict(cfg, L, 2, "eager")["attn_extra_memory"] == 2 * 4 * L * L * 2


def test_model_speed_end_to_end_cpu(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_ahfa  # noqa: F401
    from hf_ahfa.eval.model_speed import measure, write_model_speed_report

    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    rows = measure(model, ["ahfa", "sdpa"], [16], decode_tokens=2, progress=False)
    assert [r["impl"] for r in rows] == ["ahfa", "sdpa"]
    assert all(r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["train_step_s"] > 0 for r in rows)
    paths = write_model_speed_report(rows, {"model": "tiny", "dtype": "float32"}, tmp_path, "m")
    assert "prefill speed-up vs sdpa" in paths["md"].read_text() and paths["png"].exists()
