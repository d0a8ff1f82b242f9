"""Packaging: one import root, subpackages mapped from the top-level folders, wheel contents."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import hf_ahfa

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_resolve_to_their_folders():
    for sub in ("kernels", "patches", "eval"):
        spec = importlib.util.find_spec(f"hf_ahfa.{sub}")
        assert spec is not None, sub
        assert Path(spec.origin).parent.name == sub


def test_our_kernels_folder_never_shadows_huggingface_kernels():
    # a top-level `kernels` must be Hugging Face's package (or absent), never our folder
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        assert Path(spec.origin).resolve().parent != (ROOT / "kernels").resolve()
    assert str(ROOT) not in [str(Path(p).resolve()) for p in sys.path if p]


def test_registered_with_transformers():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert AttentionInterface._global_mapping[hf_ahfa.NAME] is not None
    assert hf_ahfa.NAME in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    assert "flash" not in hf_ahfa.NAME and "/" not in hf_ahfa.NAME


def test_wheel_install_imports(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
    )
    (wheel,) = wheels.glob("hf_ahfa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for sub in ("kernels", "patches", "eval"):
        assert f"hf_ahfa/{sub}/__init__.py" in names
    assert "hf_ahfa/py.typed" in names  # type checkers read the package's annotations
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("kernels/", "patches/", "eval/", "tests/")) for n in names)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    probe = "import hf_ahfa, hf_ahfa.kernels as k; print(hf_ahfa.kernels.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
        check=True, capture_output=True, text=True,
    ).stdout
    assert out.strip().startswith(str(target))
