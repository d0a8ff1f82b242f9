"""``python -m hf_ahfa.run MODULE ...``: a tool that builds its own models gets ``attn_implementation="ahfa"``."""

from __future__ import annotations

import os
import subprocess
import sys

TOOL = '''
import sys
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=64)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ahfa")
print(model.config._attn_implementation, sys.argv[1:])
'''


def _run(tmp_path, *cmd):
    (tmp_path / "some_tool.py").write_text(TOOL)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1"}
    return subprocess.run([sys.executable, *cmd], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_runner_makes_ahfa_available_to_a_tool(tmp_path):
    plain = _run(tmp_path, "-m", "some_tool")
    assert plain.returncode != 0 and "ahfa" in plain.stderr  # the tool alone does not know "ahfa"
    run = _run(tmp_path, "-m", "hf_ahfa.run", "some_tool", "--tasks", "x")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "ahfa ['--tasks', 'x']"


def test_runner_usage(tmp_path):
    run = _run(tmp_path, "-m", "hf_ahfa.run")
    assert run.returncode == 2 and "python -m hf_ahfa.run MODULE" in run.stdout
