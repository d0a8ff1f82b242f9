"""The speed report (CPU): FLOP counts, ratios and the files written from benchmark rows."""

from __future__ import annotations

import functools
import json

import pytest
import torch

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


def test_decode_only_report(tmp_path):
    # `ahfa-eval speed --seq-lens ""`: decode rows alone, each against sdpa at its KV length (no prefill plot)
    rows = [Row("decode", p, "fwd", False, 8, 32, 8, 1, K, 128, ms, ms, ms, tbps=1.0).__dict__
            for p, K, ms in [("ahfa", 1024, 0.05), ("sdpa", 1024, 0.04), ("ahfa", 8192, 0.1), ("sdpa", 8192, 0.1)]]
    paths = write_speed_report(rows, tmp_path, "decode")
    md = paths["md"].read_text()
    assert "0.80x" in md and "1.00x" in md and "ahfa vs cuDNN" not in md
    assert "png" not in paths and not (tmp_path / "decode.png").exists()


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
    md = paths["md"].read_text()
    assert "prefill vs sdpa" in md and paths["png"].exists()
    # a length measured in both modes: each row against the baseline's row of its own mode
    base = {"attn_flops": 0, "attn_extra_memory": 0, "seq_len": 16}
    rows2 = [{**base, "impl": "ahfa", "prefill_s": 1.0, "decode_tokens_per_s": 30.0},
             {**base, "impl": "ahfa", "prefill_s": 3.0, "train_step_s": 8.0},
             {**base, "impl": "sdpa", "prefill_s": 2.0, "decode_tokens_per_s": 20.0},
             {**base, "impl": "sdpa", "prefill_s": 6.0, "train_step_s": 4.0}]
    md2 = write_model_speed_report(rows2, {"model": "t", "dtype": "float32"}, tmp_path, "m2")["md"].read_text()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in md2.splitlines() if line.startswith("| ahfa ")]
    assert [c[8:11] for c in cells] == [["2", "1.5", ""], ["2", "", "0.5"]]
    # PyTorch tracks no peak of CPU allocations: the figure does not exist, and the table says so
    assert all(r["prefill_peak_bytes"] is None for r in rows)
    assert all(line.split(" | ")[3] == "n/a" for line in md.splitlines() if line.startswith(("| ahfa ", "| sdpa ")))


def test_model_speed_rounds_alternate_and_take_the_median(monkeypatch):
    from hf_ahfa.eval import model_speed

    model = _tiny_gemma3()
    order = []
    times = iter([5.0, 1.0, 2.0, 6.0, 9.0, 3.0])  # in the order measured: ahfa 5, 6, 9 / sdpa 1, 2, 3

    def fake(model, ids, row, device, decode_tokens, train, last_logits):
        order.append(model.config._attn_implementation)
        row["prefill_s"] = next(times)

    monkeypatch.setattr(model_speed, "_measure_one", fake)
    rows = model_speed.measure(model, ["ahfa", "sdpa"], [16], progress=False, rounds=3)
    assert order == ["ahfa", "sdpa", "sdpa", "ahfa", "ahfa", "sdpa"]  # A B, B A, A B
    by = {r["impl"]: r for r in rows}
    assert [r["impl"] for r in rows] == ["ahfa", "sdpa"]
    assert by["ahfa"]["prefill_s_runs"] == [5.0, 6.0, 9.0] and by["ahfa"]["prefill_s"] == 6.0
    assert by["sdpa"]["prefill_s_runs"] == [1.0, 2.0, 3.0] and by["sdpa"]["prefill_s"] == 2.0
    times = iter([5.0, 1.0, 2.0, 6.0])  # two rounds: the mean of the two, for times and rates alike
    by = {r["impl"]: r for r in model_speed.measure(model, ["ahfa", "sdpa"], [16], progress=False, rounds=2)}
    assert by["ahfa"]["prefill_s"] == 5.5 and by["sdpa"]["prefill_s"] == 1.5


def test_model_speed_prefill_of_the_last_logits_only():
    """``last_logits``: the timed prefill asks for the last position's logits only (as generate() prefills);
    by default every position's (a plain forward)."""
    model = _tiny_gemma3()
    kept = []
    forward = model.forward
    model.forward = lambda *a, **kw: kept.append(kw.get("logits_to_keep")) or forward(*a, **kw)
    from hf_ahfa.eval.model_speed import measure

    measure(model, ["ahfa"], [16], decode_tokens=0, train=False, progress=False, last_logits=True)
    last, kept[:] = list(kept), []
    measure(model, ["ahfa"], [16], decode_tokens=0, train=False, progress=False)
    assert set(last) == {1} and set(kept) == {None}, (last, kept)


def test_paired_prefill_takes_turns_and_bounds_the_speedup(monkeypatch, tmp_path):
    """Single prefills taking turns (A B, B A, ...) after one warm-up call each; the speed-up is the baseline's
    mean time over the other's, with its paired bootstrap interval; the report gets a column for it."""
    from types import SimpleNamespace

    from hf_ahfa.eval import model_speed

    model = _tiny_gemma3()
    clock, order, cost = [0.0], [], {"ahfa": [2.0], "sdpa": [3.0]}
    forward = model.forward

    def timed(*args, **kwargs):  # each call advances the clock by its implementation's next cost
        impl = model.config._attn_implementation
        order.append(impl)
        clock[0] += cost[impl][len([o for o in order if o == impl]) % len(cost[impl])]
        return forward(*args, **kwargs)

    model.forward = timed
    monkeypatch.setattr(model_speed, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    masks = []
    model.forward = lambda *a, **kw: masks.append(kw.get("attention_mask")) or timed(*a, **kw)
    model_speed.paired_prefill(model, ["ahfa", "sdpa"], [16], pairs=1, progress=False, ones_mask=True)
    assert len(masks) == 4 and all(m is not None and m.shape == (1, 16) and bool(m.all()) for m in masks)
    model.forward = timed
    order.clear()
    got = model_speed.paired_prefill(model, ["ahfa", "sdpa"], [16], pairs=4, progress=False)
    assert order == ["ahfa", "sdpa"] + ["ahfa", "sdpa", "sdpa", "ahfa"] * 2
    assert got["ahfa", 16] == dict(speedup=pytest.approx(1.5), low=pytest.approx(1.5), high=pytest.approx(1.5),
                                   pairs=4, median_s=2.0, base_median_s=3.0)
    order.clear()  # three: each takes each place in turn (with forward and reversed turns one stays in the middle)
    cost["eager"] = [3.0]
    model_speed.paired_prefill(model, ["ahfa", "eager", "sdpa"], [16], pairs=3, progress=False)
    assert order == ["ahfa", "eager", "sdpa"] * 2 + ["eager", "sdpa", "ahfa", "sdpa", "ahfa", "eager"]
    cost["ahfa"] = [1.0, 3.0]  # the same mean, spread: the interval widens around it
    order.clear()
    noisy = model_speed.paired_prefill(model, ["ahfa", "sdpa"], [16], pairs=8, progress=False)["ahfa", 16]
    assert noisy["speedup"] == pytest.approx(1.5) and noisy["low"] < noisy["speedup"] < noisy["high"]
    base = {"attn_flops": 0, "attn_extra_memory": 0, "seq_len": 16}
    rows = [{**base, "impl": "ahfa", "prefill_s": 2.0, "prefill_paired": got["ahfa", 16]},
            {**base, "impl": "sdpa", "prefill_s": 3.0}]
    md = model_speed.write_model_speed_report(rows, {"model": "t", "dtype": "float32"}, tmp_path, "p")["md"]
    text = md.read_text()
    assert "prefill vs sdpa, calls taking turns (95% interval)" in text and "1.500 (1.500-1.500, 4 pairs)" in text


def test_speed_command_paired_prefill_column(tiny_llama, tmp_path):
    """``ahfa-eval speed --model ... --paired N``: each ahfa variant's prefill row carries its paired speed-up."""
    from hf_ahfa.eval import cli

    cli.main(["speed", "--model", str(tiny_llama), "--seq-lens", "16", "--decode-tokens", "2", "--no-train",
              "--rounds", "1", "--paired", "3", "--device", "cpu", "--out-dir", str(tmp_path), "--name", "s"])
    rows = {r["impl"]: r for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    for metric in ("prefill", "decode"):
        paired = rows["ahfa"][f"{metric}_paired"]
        assert paired["pairs"] == 3 and paired["low"] <= paired["speedup"] <= paired["high"]
        assert f"{metric}_paired" not in rows["sdpa"]
        assert f"{metric} vs sdpa, calls taking turns" in (tmp_path / "s.md").read_text()


def test_paired_decode_times_the_steps_alone(monkeypatch):
    """paired_decode: each sample is the decode steps on the cache of an untimed prefill, the implementations
    taking turns; the speed-up is the ratio of the steps' times."""
    from types import SimpleNamespace

    from hf_ahfa.eval import model_speed

    model = _tiny_gemma3()
    clock, calls, cost = [0.0], [], {"ahfa": 2.0, "sdpa": 3.0}
    forward = model.forward

    @functools.wraps(forward)  # (the forward's signature names the cache argument)
    def timed(*args, **kwargs):  # each forward advances the clock by its implementation's cost
        impl = model.config._attn_implementation
        calls.append((impl, args[0].shape[1] if args else kwargs["input_ids"].shape[1]))
        clock[0] += cost[impl]
        return forward(*args, **kwargs)

    model.forward = timed
    monkeypatch.setattr(model_speed, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    got = model_speed.paired_decode(model, ["ahfa", "sdpa"], [16], pairs=2, decode_tokens=3, progress=False)
    assert got["ahfa", 16] == dict(speedup=pytest.approx(1.5), low=pytest.approx(1.5), high=pytest.approx(1.5),
                                   pairs=2, median_s=6.0, base_median_s=9.0)
    one = [(16,), (1,) * 3]  # a prefill of 16 tokens, then three steps of one
    assert [n for _, n in calls] == [n for _ in range(6) for part in one for n in part]
    assert [impl for impl, n in calls if n == 16] == ["ahfa", "sdpa", "ahfa", "sdpa", "sdpa", "ahfa"]
    with pytest.raises(ValueError, match="decode_tokens"):
        model_speed.paired_decode(model, ["ahfa", "sdpa"], [16], decode_tokens=0)


def _tiny_gemma3():
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_ahfa  # noqa: F401

    cfg = AutoConfig.for_model("gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="ahfa").eval()


def test_attention_capture_records_every_call():
    from hf_ahfa.eval.attention_speed import capture_calls

    model = _tiny_gemma3()
    ids = torch.randint(0, 64, (1, 40))
    calls = capture_calls(model, ids)
    assert [(c["layer"], c["window"], c["causal"]) for c in calls] == [(0, 8, True), (1, None, True)]
    assert calls[0]["q"].shape == (1, 40, 2, 16) and calls[0]["k"].shape == (1, 40, 1, 16)
    assert calls[0]["scale"] == 16**-0.5
    assert model.config._attn_implementation == "ahfa"  # restored



def test_attention_replay_cpu(monkeypatch):
    # every provider replays the recorded calls; adaptive rows carry the kept share per layer
    import hf_ahfa
    from hf_ahfa.eval.attention_speed import capture_calls, measure

    monkeypatch.setenv("AHFA_BACKEND", "triton")
    model = _tiny_gemma3()
    calls = capture_calls(model, torch.randint(0, 64, (1, 128), generator=torch.Generator().manual_seed(0)))
    policy = hf_ahfa.AdaptivePolicy(mode="adaptive", tau=0.3, block_size=16, stride=8, local_blocks=1)
    rows = measure(calls, {"ahfa": None, "ahfa-adaptive": policy}, ["sdpa"], repeat=1)
    by = {r["provider"]: r for r in rows}
    assert all(by[p]["ms"] > 0 and by[p]["full_ms"] > 0 for p in ("ahfa", "ahfa-routed", "ahfa-adaptive", "sdpa"))
    assert set(by["ahfa-adaptive"]["layer_density"]) == {"1"} and by["ahfa-adaptive"]["density"] < 1


def test_model_speed_variants_and_real_tokens():
    from hf_ahfa.eval.model_speed import measure

    model = _tiny_gemma3()
    tokens = list(range(1, 40))
    policies = {"ahfa-exact": ("ahfa", {"mode": "exact"}), "ahfa-adaptive-tau0.5": ("ahfa", {"mode": "adaptive", "tau": 0.5})}
    rows = measure(model, [*policies, "sdpa"], [32], decode_tokens=0, train=False, progress=False, policies=policies,
                   tokens=tokens)
    assert [r["impl"] for r in rows] == ["ahfa-exact", "ahfa-adaptive-tau0.5", "sdpa"]
    assert all(r["prefill_s"] > 0 and "decode_tokens_per_s" not in r for r in rows)


def test_attention_report_lines():
    from hf_ahfa.eval.attention_speed import report_lines

    rows = [{"seq_len": 8192, "provider": p, "layers": 3, "full_layers": 1, "ms": ms, "full_ms": ms / 2,
             "density": d} for p, ms, d in (("ahfa", 4.0, None), ("ahfa-adaptive-tau0.9", 2.0, 0.5),
                                           ("sdpa-cudnn", 3.0, None), ("sdpa-flash", 6.0, None))]
    text = "\n".join(report_lines(rows))
    assert "8192 tokens (3 attention layers, 1 without a window)" in text
    assert "| ahfa-adaptive-tau0.9 | 2 | 1 | 0.5 | 1.50x | 1.50x | 3.00x | 3.00x | 2.00x | 2.00x |" in text
    assert "| sdpa-cudnn | 3 | 1.5 | n/a |" in text  # no kept-block share where nothing ran block-sparse


def test_model_speed_script_pairs_the_floor_and_the_baseline_with_itself(tmp_path):
    """scripts/model_prefill_speed.py on the CPU, host-bound layout, packing off: ahfa paired against sdpa, the A/A
    pairing and the floor (a bare SDPA call in Transformers' place) are in the report's JSON and Markdown."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "scripts" / "model_prefill_speed.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--layout", "qwen2-host", "--seq-lens", "40",
                           "--rounds", "1", "--decode-tokens", "2", "--prefill-logits", "last", "--no-own-kernels",
                           "--paired", "2", "--paired-aa", "--floor", "--no-packed-decode", "--out-dir", str(tmp_path),
                           "--name", "m"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "m.json").read_text())
    config = data["config"]
    assert config["packed decode"] == "off"
    assert set(config["a/a"]) == {"sdpa-again 40", "sdpa-again decode 40"}
    assert set(config["floor"]) == {"sdpa-bare 40", "sdpa-bare decode 40"}
    ahfa = [r for r in data["rows"] if r["impl"] == "ahfa"]
    assert len(ahfa) == 1 and ahfa[0]["prefill_paired"]["pairs"] == 2 and ahfa[0]["decode_paired"]["pairs"] == 2
    md = (tmp_path / "m.md").read_text()
    assert "\nfloor: " in md and "\na/a: " in md and "\npacked decode: " in md


def test_model_speed_script_compares_a_softcapped_layout_with_eager(tmp_path):
    """scripts/model_prefill_speed.py --layout gemma2-host --baseline eager (Gemma-2's layers, softcap and windows at
    tiny widths): ahfa's rows against eager's, the A/A pairing of eager; --floor (a bare SDPA call) needs sdpa."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "scripts" / "model_prefill_speed.py"
    args = [sys.executable, str(script), "--device", "cpu", "--layout", "gemma2-host", "--baseline", "eager",
            "--seq-lens", "24", "--rounds", "1", "--decode-tokens", "2", "--no-own-kernels", "--out-dir", str(tmp_path),
            "--name", "g"]
    proc = subprocess.run(args + ["--paired", "2", "--paired-aa"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "g.json").read_text())
    assert [r["impl"] for r in data["rows"]] == ["ahfa", "eager"] and "softcap" in data["config"]["model"]
    assert set(data["config"]["a/a"]) == {"eager-again 24", "eager-again decode 24"}
    assert "prefill vs eager" in (tmp_path / "g.md").read_text()
    proc = subprocess.run(args + ["--paired", "2", "--floor"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "--floor pairs a bare SDPA call against sdpa" in proc.stderr



@pytest.mark.parametrize("T,causal", [(128 * 16, True), (128 * 16 - 5, True), (128 * 12 + 1, False)])
def test_random_layout_lists_as_full_only_tiles_every_query_fully_sees(T, causal):
    """``ahfa-sparse-D``'s layouts (also ``scripts/profile_adaptive.py --kept``): about the share asked, the sink
    and diagonal kept, and a tile listed as needing no mask only where every query of it sees every key."""
    from hf_ahfa.eval.speed import random_layout, visible_blocks

    B, H, block = 1, 3, 128
    lay = random_layout(B, H, T, 0.4, causal, "cpu", block=block)
    keep, full = lay.to_dense(), lay.to_dense(full=True)
    n = -(-T // block)
    assert keep[..., 0].all() and keep.diagonal(dim1=-2, dim2=-1).all() and (full & ~keep).sum() == 0
    assert not torch.equal(keep[0, 0], keep[0, 1])  # drawn per head
    assert 0.4 < lay.density(visible_blocks(T, causal, "cpu", block)) < 0.65  # with the sink and the diagonal
    pos = torch.arange(n * block)
    seen = (pos[None, :] <= pos[:, None]) if causal else torch.ones(n * block, n * block, dtype=torch.bool)
    seen = seen & (pos[None, :] < T)
    whole = seen.reshape(n, block, n, block).all(3).all(1)  # tiles every query (row) fully sees
    assert (full <= whole).all() and full.any()
    assert torch.equal(full, keep & whole)  # every such kept tile is listed as full


def test_speed_variants_one_per_tau_and_skip_mass_and_knobs_refused_in_exact_mode(monkeypatch):
    import argparse

    from hf_ahfa.eval.speed_command import _variants
    from hf_ahfa.eval.usage import UsageError

    def variants(**kw):
        return _variants(argparse.Namespace(**{"mode": "adaptive", "tau": None, "skip_mass": None, "device": "cpu",
                                                **kw}))

    with pytest.raises(UsageError, match="--skip-mass: in-kernel skipping runs on the Triton kernels"):
        variants(skip_mass=[0.01])  # the CPU's default backend is the reference
    monkeypatch.setenv("AHFA_BACKEND", "triton")

    got = variants(tau=[0.99, 0.95], skip_mass=[0.0, 0.01])
    assert list(got) == ["ahfa", "ahfa-adaptive-tau0.99", "ahfa-adaptive-tau0.99-skip0.01", "ahfa-adaptive-tau0.95",
                         "ahfa-adaptive-tau0.95-skip0.01"]
    assert got["ahfa-adaptive-tau0.95-skip0.01"] == ("ahfa", {"mode": "adaptive", "tau": 0.95, "skip_mass": 0.01})
    assert "skip_mass" not in got["ahfa-adaptive-tau0.99"][1]
    with pytest.raises(UsageError, match="--skip-mass set the adaptive mode, which --mode exact does not run"):
        variants(mode="exact", skip_mass=[0.01])
    with pytest.raises(UsageError, match="skip_mass must be in"):
        variants(skip_mass=[1.0])
