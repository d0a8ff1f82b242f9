"""``ahfa-eval train`` on the CPU: the windows, the paired interval, the command end to end on a tiny Llama
(tau = 1 keeps every block: the adaptive fine-tune's losses equal exact's), and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from hf_ahfa.eval import cli, train
from hf_ahfa.eval.report import paired_change
from hf_ahfa.eval.usage import UsageError


def test_windows_are_consecutive_and_start_with_the_document_token():
    ids = list(range(100))
    w = train.windows(ids, 8, 3, start=-1)
    assert w.shape == (3, 8) and w[:, 0].tolist() == [-1] * 3
    assert w[:, 1:].flatten().tolist() == [i for i in range(24) if i % 8]
    assert train.windows(ids, 8, 3, start=None).flatten().tolist() == list(range(24))
    # fewer windows than steps: all there are (the Trainer goes over them again); none: an error
    assert train.windows(ids, 32, 5, start=None).flatten().tolist() == list(range(96))
    with pytest.raises(UsageError, match="hold 100 tokens, less than one window of --seq-len 128"):
        train.windows(ids, 128, 5, start=None)


def test_paired_change_interval():
    base = [3.0, 2.5, 2.0, 1.8]
    same = paired_change(base, base)
    assert same == dict(change=0.0, low=0.0, high=0.0)
    up = paired_change([x * 1.02 for x in base], base)
    assert up["change"] == pytest.approx(0.02) and up["low"] == pytest.approx(0.02) and up["high"] == pytest.approx(0.02)
    noisy = paired_change([3.1, 2.4, 2.1, 1.7], base)
    assert noisy["low"] < noisy["change"] < noisy["high"]


def _run(*argv):
    cli.main(["train", *map(str, argv)])


def _fine_tune(model, book, out, name, steps=4, *extra):
    """adaptive tau 1 (every block kept) against ahfa exact, 64-token windows; the report's JSON."""
    _run("--model", model, "--data-files", book, "--seq-len", 64, "--steps", steps, "--warmup-steps", 1,
         "--mode", "adaptive", "--tau", "1.0", "--block-size", 16, "--lora-r", 4, "--device", "cpu",
         "--out-dir", out, "--name", name, *extra)
    return json.loads((out / f"{name}.json").read_text())


def test_train_end_to_end(tiny_llama, tiny_text, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(tiny_text(2000, 3))
    data = _fine_tune(tiny_llama, book, tmp_path, "t")
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"ahfa-adaptive-tau1", "ahfa-exact"}
    for r in rows.values():
        assert len(r["losses"]) == 4 and len(r["step_s"]) == 4 and all(torch.isfinite(torch.tensor(r["losses"])))
    # the adaptive mode ran block-sparse (every block kept at tau = 1) and trained exactly as exact attention
    assert rows["ahfa-adaptive-tau1"]["kept_share"] == 1.0 and rows["ahfa-exact"]["kept_share"] is None
    # the dtype the attention ran in, from record(): float32 on the CPU (bf16 autocast only on CUDA)
    assert {r["attention_dtype"] for r in rows.values()} == {"float32"}
    assert rows["ahfa-adaptive-tau1"]["losses"] == pytest.approx(rows["ahfa-exact"]["losses"], abs=2e-4)
    assert rows["ahfa-exact"]["losses"][0] != rows["ahfa-exact"]["losses"][-1]  # it trained
    (s,) = data["summary"]
    assert s["impl"] == "ahfa-adaptive-tau1" and abs(s["change"]) < 1e-4 and s["passed"]
    assert (tmp_path / "t.png").stat().st_size > 5000 and "95% interval" in (tmp_path / "t.md").read_text()
    assert "wrote" in capsys.readouterr().out
    # recomputing activations in the backward trains the same
    again = {r["impl"]: r for r in _fine_tune(tiny_llama, book, tmp_path, "t2", 4, "--gradient-checkpointing")["rows"]}
    assert again["ahfa-exact"]["losses"] == pytest.approx(rows["ahfa-exact"]["losses"], abs=2e-4)
    # the loss taken 16 positions at a time (no full logits) trains the same
    chunked = {r["impl"]: r for r in _fine_tune(tiny_llama, book, tmp_path, "t4", 4, "--loss-chunk", 16)["rows"]}
    assert chunked["ahfa-exact"]["losses"] == pytest.approx(rows["ahfa-exact"]["losses"], abs=2e-4)
    # a text of fewer windows than steps: the steps go over them again, in the same order for both variants
    short = tmp_path / "short.txt"
    short.write_text(tiny_text(150, 3))
    data = _fine_tune(tiny_llama, short, tmp_path, "t3", 5)
    assert 1 <= data["config"]["windows"] < 5
    cycled = {r["impl"]: r["losses"] for r in data["rows"]}
    assert all(len(v) == 5 for v in cycled.values())
    assert cycled["ahfa-adaptive-tau1"] == pytest.approx(cycled["ahfa-exact"], abs=2e-4)


@pytest.mark.parametrize("argv,match", [
    (["--steps", "3", "--warmup-steps", "3"], "--warmup-steps must be in"),
    (["--seq-len", "0"], "--seq-len must be at least 1"),
    (["--mode", "exact"], "compares ahfa exact with itself"),
    (["--seq-len", "512"], "above the model's 256 positions"),
    (["--dtype", "bfloat16"], "train keeps float32 weights"),
    (["--skip-mass", "0.01"], "--skip-mass is for inference"),
    (["--loss-chunk", "-1"], "--loss-chunk must be 0 (off) or positive"),
])
def test_bad_input_is_one_line(tiny_llama, tiny_text, tmp_path, capsys, argv, match):
    book = tmp_path / "book.txt"
    book.write_text(tiny_text(500, 4))
    with pytest.raises(SystemExit) as exit_:
        _run("--model", tiny_llama, "--data-files", book, "--seq-len", 64, "--device", "cpu", "--out-dir", tmp_path,
             *argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines()[-1].startswith("ahfa-eval train: error: ")
    assert match in err and "Traceback" not in err


@pytest.mark.parametrize("chunk", [0, 8])
def test_the_chunked_loss_trains_under_the_trainers_mixed_precision(tmp_path, chunk):
    # the chunked loss calls the decoder alone, past accelerate's autocast wrapper of model.forward: a bf16
    # fine-tune with --loss-chunk ran in float32 (chunk 0: the model's own loss, the behaviour to match)
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    ids = torch.randint(0, 97, (2, 16))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, bf16=True,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer_class = train._chunked_loss_trainer(Trainer, chunk) if chunk else Trainer
    trainer_class(model=model, args=args, train_dataset=train._Windows(ids)).train()
    assert seen and set(seen) == {torch.bfloat16}, seen
