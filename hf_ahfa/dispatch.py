"""Backend choice: Triton kernels on CUDA when they can run the call, else the PyTorch reference.

``AHFA_BACKEND=reference|triton`` (or ``attention(..., backend=...)``) forces one; a forced backend that
cannot run raises instead of falling back. Automatic fallback is logged once per reason.
"""

from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("reference", "triton")
logger = logging.getLogger("hf_ahfa")
_said: set[str] = set()


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device`` (``None`` when it can)."""
    if device.type != "cuda":
        return f"Triton kernels need a CUDA tensor, got device {device}"
    try:
        from hf_ahfa.kernels import flash_attention  # noqa: F401
    except ImportError:
        return "hf_ahfa.kernels has no Triton attention kernels in this build"
    return None


def choose_backend(device: torch.device, requested: str | None = None) -> str:
    requested = requested or os.environ.get("AHFA_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend (or AHFA_BACKEND) must be one of {BACKENDS}, got {requested!r}")
        if requested == "triton" and (reason := triton_unavailable_reason(device)):
            raise RuntimeError(f"backend 'triton' was requested but cannot run: {reason}")
        return requested
    if device.type == "cuda":
        if (reason := triton_unavailable_reason(device)) is None:
            return "triton"
        if reason not in _said:
            _said.add(reason)
            logger.warning("hf_ahfa: using the PyTorch reference backend: %s", reason)
    return "reference"
