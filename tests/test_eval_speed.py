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
