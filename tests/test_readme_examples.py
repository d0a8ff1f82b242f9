"""The README's Quick start and the scripts in ``examples/`` run as written, at tiny sizes on the CPU: the
model folder is a random 2-layer Llama with a word-level tokenizer (``tiny_llama``) instead of a real model.
``examples/demo.py`` is what ``make demo`` runs, on the real model it converts."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = '"~/.cache/hf_ahfa/smollm2-135m-instruct"'  # the Quick start's path: the folder `make demo` writes


def _quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs_as_written(tiny_llama):
    code = _quick_start()
    assert DEMO_MODEL in code, "the Quick start no longer loads the model make demo converts"
    scope: dict = {}
    exec(compile(code.replace(DEMO_MODEL, repr(str(tiny_llama))), "README.md (Quick start)", "exec"), scope)
    assert scope["model"].config._attn_implementation == "ahfa"
    assert scope["out"].shape == (2, 1024, 8, 64) and scope["lse"].shape == (2, 8, 1024)
    assert torch.isfinite(scope["out"]).all()


def _run_example(name: str, *argv, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *map(str, argv)])
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_long_prompt_generate(tiny_llama, tiny_text, tmp_path, cache, capsys, monkeypatch):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(tiny_text(300, 1))
    _run_example("long_prompt_generate.py", "--model", tiny_llama, "--prompt-file", prompt, "--tokens", 96,
                 "--new-tokens", 6, "--cache", cache, monkeypatch=monkeypatch)
    lines = dict(re.findall(r"^\[(\w+)\] 96 prompt tokens, 6 new in [\d.]+ s: (.*)$", capsys.readouterr().out, re.M))
    assert set(lines) == {"ahfa", "sdpa"} and lines["ahfa"] == lines["sdpa"]  # greedy: the same tokens


def test_long_context_perplexity(tiny_llama, tiny_text, tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    books = [tmp_path / f"book{i}.txt" for i in range(2)]
    for i, book in enumerate(books):
        book.write_text(tiny_text(400, 10 + i))
    _run_example("long_context_perplexity.py", "--model", tiny_llama, *books, "--context-lengths", "64,128",
                 "--out-dir", tmp_path / "out", monkeypatch=monkeypatch)
    rows = json.loads((tmp_path / "out" / "long-context.json").read_text())["rows"]
    assert {(r["impl"], r["title"], r["ctx"]) for r in rows} == {
        (impl, book.name, ctx) for impl in ("ahfa", "sdpa") for book in books for ctx in (64, 128)}


def test_finetune_lora(tiny_llama, tiny_text, tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text(tiny_text(600, 3))
    out = tmp_path / "lora"
    _run_example("finetune_lora.py", "--model", tiny_llama, "--text", text, "--block-size", 32, "--steps", 2,
                 "--output-dir", out, monkeypatch=monkeypatch)
    assert (out / "adapter_config.json").exists()
