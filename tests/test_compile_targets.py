"""The Triton kernels compile for the GPUs (no GPU needed): ``scripts/compile_check.py`` in a process without
``TRITON_INTERPRET``, every variant for sm90 and two for sm80, and every sm80 launch config.

The rest of the CPU suite runs the kernels under the interpreter, which accepts code the GPU compiler refuses
(kernels/NOTES.md: a tuple holding None compiled nowhere on triton 3.6 and ran on the interpreter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_check.py"


def _compile(*args: str, **env_vars: str) -> str:
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env_vars}
    res = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout


@pytest.mark.parametrize("arch,variants", [("90", "all"), ("80", "causal,decode")])
def test_kernels_compile_for_gpu_targets(arch, variants):
    out = _compile("--arch", arch, "--variants", variants)
    lines = [line for line in out.splitlines() if line.startswith("ok ")]
    assert len(lines) == (14 if variants == "all" else 2), out
    for kernel in ("flash_fwd_kernel", "flash_bwd_dkdv_kernel", "flash_bwd_dq_kernel", "flash_decode_kernel",
                   "flash_decode_combine_kernel"):
        assert kernel in out, f"{kernel} was not compiled:\n{out}"
    if variants == "all":
        for kernel in ("estimate_mass_kernel", "keep_blocks_kernel", "compress_kernel"):
            assert kernel in out, f"{kernel} was not compiled:\n{out}"


def test_pointer_loads_compile_for_sm90():
    """``AHFA_TMA=0``: the forward's pointer-load variants, which sm90 also runs where TMA does not fit or is slower
    (the variants above load through TMA on sm90)."""
    out = _compile("--arch", "90", "--variants", "causal,padding_mask,block_sparse", AHFA_TMA="0")
    assert sum(line.startswith("ok ") for line in out.splitlines()) == 3, out


def test_alibi_key_term_form_compiles_for_sm90():
    """``AHFA_ALIBI=keys``: the causal ALiBi variants with the key's term alone in every kernel (the forward, both
    backward kernels, decode; the default ``fwd-keys`` compiles the forward's and decode's in the "all" set)."""
    out = _compile("--arch", "90", "--variants", "alibi,alibi_decode", AHFA_ALIBI="keys")
    assert sum(line.startswith("ok ") for line in out.splitlines()) == 2, out


def test_compile_check_refuses_the_interpreter_and_unknown_variants():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "TRITON_INTERPRET" in res.stderr
    env.pop("TRITON_INTERPRET")
    res = subprocess.run([sys.executable, str(SCRIPT), "--variants", "causal,nope"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "nope" in res.stderr


def test_every_sm80_table_entry_compiles_and_fits_an_a100():
    """No A100 has been available: each sm80 launch config of the forward and backward tables (16-bit and float32)
    is compiled pinned and its shared memory checked against the A100's 163 KB (the sm90 entries run on the GPU
    tests)."""
    from hf_ahfa.kernels import configs

    out = _compile("--arch", "80", "--all-configs")
    tables = (configs.FWD, configs.BWD, configs.FWD_FLOAT32, configs.BWD_FLOAT32)
    entries = sum(len(c) for table in tables for c in table["sm80"].values())
    assert sum(line.startswith("ok ") for line in out.splitlines()) == entries, out
