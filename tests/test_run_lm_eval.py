"""lm-evaluation-harness (a tool that builds its models itself) runs a model with ``attn_implementation=ahfa``
through ``python -m hf_ahfa.run lm_eval ...``, and gives the word perplexity sdpa gives; without the hook the
same command fails. Tiny Llama, a two-document rolling-loglikelihood task on a local file, CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

TASK = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


@pytest.fixture
def task_dir(tmp_path, tiny_text):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": tiny_text(40, seed)}) + "\n" for seed in range(2)))
    (tmp_path / "tiny_ppl.yaml").write_text(TASK.format(data=data))
    return tmp_path


def _lm_eval(launcher, model, impl, task_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(task_dir / "cache"),
               PYTHONSAFEPATH="1")
    cmd = [sys.executable, "-m", *launcher, "--model", "hf", "--model_args",
           f"pretrained={model},attn_implementation={impl}", "--tasks", "tiny_ppl", "--include_path", str(task_dir),
           "--device", "cpu", "--batch_size", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=task_dir)


def _word_perplexity(out: str) -> float:
    return float(re.search(r"\|tiny_ppl\s*\|.*\|word_perplexity\|\S*\s*\|([\d.]+)\|", out).group(1))


def test_lm_eval_runs_ahfa_through_the_hook(tiny_llama, task_dir):
    ahfa = _lm_eval(["hf_ahfa.run", "lm_eval"], tiny_llama, "ahfa", task_dir)
    assert ahfa.returncode == 0, ahfa.stderr[-3000:]
    sdpa = _lm_eval(["lm_eval"], tiny_llama, "sdpa", task_dir)
    assert sdpa.returncode == 0, sdpa.stderr[-3000:]
    assert _word_perplexity(ahfa.stdout) == _word_perplexity(sdpa.stdout) > 1
    # without the hook lm_eval never imports hf_ahfa: Transformers does not know "ahfa"
    plain = _lm_eval(["lm_eval"], tiny_llama, "ahfa", task_dir)
    assert plain.returncode != 0 and "ahfa" in plain.stderr
