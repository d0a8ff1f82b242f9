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


def triton_unavailable_reason(q: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run a call with query ``q`` (``None`` when it can)."""
    try:
        from hf_ahfa.kernels.flash import check_supported
    except ImportError as err:
        return f"the Triton kernels cannot be imported ({err})"
    try:
        check_supported(q)
    except (TypeError, ValueError, RuntimeError) as err:
        return str(err)
    return None


def choose_backend(q: torch.Tensor, requested: str | None = None) -> str:
    requested = requested or os.environ.get("AHFA_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend (or AHFA_BACKEND) must be one of {BACKENDS}, got {requested!r}")
        if requested == "triton" and (reason := triton_unavailable_reason(q)):
            raise RuntimeError(f"backend 'triton' was requested but cannot run: {reason}")
        return requested
    if q.device.type == "cuda":
        if (reason := triton_unavailable_reason(q)) is None:
            return "triton"
        if reason not in _said:
            _said.add(reason)
            logger.warning("hf_ahfa: using the PyTorch reference backend: %s", reason)
    return "reference"
