"""Exact attention kernels the user installed: flash-attn 2 (``flash_attn``) and 3 (``flash_attn_interface``).

The router offers them, beside PyTorch's SDPA and our kernels, as timed candidates (``hf_ahfa.fastest``) for the
exact calls they compute exactly; none is a dependency. Their semantics, from flash-attn's documentation, are
ours (``hf_ahfa.spec.AttnCall``): queries bottom-right aligned, so that with ``causal`` or ``window_size =
(left, right)`` query ``i`` sees keys ``i + K - Q - left .. i + K - Q + right``; ALiBi adds
``-slope * |i + K - Q - j|``; softcap is ``c * tanh(s / c)`` of the scaled score; a row that sees no key gives
zeros. What they do not compute (sinks, masks, dropout with our mask, the log-sum-exp, float32, a value head
dim of its own) never reaches them: ``unfit_reason``.

    flash-attn 2: flash_attn_func / flash_attn_varlen_func (packed sequences), sm80+, fp16/bf16
    flash-attn 3: flash_attn_func (unpacked, no ALiBi), sm90, fp16/bf16
"""

from __future__ import annotations

import functools
import importlib
import torch

from hf_ahfa.spec import AttnCall

# name -> (module, lowest compute capability); flash-attn 3 first: the faster where both run
KERNELS = {"flash-attn-3": ("flash_attn_interface", (9, 0)), "flash-attn-2": ("flash_attn", (8, 0))}


@functools.lru_cache(maxsize=None)
def modules() -> dict[str, object]:
    """The importable flash-attn modules by name (imported once)."""
    found = {}
    for name, (module, _) in KERNELS.items():
        try:
            found[name] = importlib.import_module(module)
        except ImportError:  # not installed, or built for another torch (an undefined symbol)
            continue
    return found


def unfit_reason(name: str, q, k, v, call: AttnCall, need_lse: bool) -> str | None:
    """Why the installed kernel ``name`` does not compute exactly this call (``None`` when it does)."""
    if need_lse:
        return "the log-sum-exp is asked for"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (flash-attn computes float16 and bfloat16)"
    if v.shape[3] != q.shape[3]:
        return "a value head dim of its own"
    if q.shape[1] == 0 or k.shape[1] == 0:
        return "an empty query or key sequence"
    if call.sinks is not None:
        return "sinks"
    if call.dropout_p > 0:
        return "dropout (ahfa draws its own mask)"
    if call.element_masks:
        return "a mask or key padding"
    if name == "flash-attn-3" and (call.alibi is not None or call.cu_seqlens is not None):
        return "ALiBi or packed sequences (flash-attn 3's dense function has neither)"
    if not runs_on(name, q.device):
        return f"{name} needs a CUDA GPU of compute capability {KERNELS[name][1]} or newer"
    return None


def runs_on(name: str, device: torch.device) -> bool:
    """Whether flash-attn ``name`` runs on ``device`` (a CUDA GPU of its compute capability or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= KERNELS[name][1]


def candidates(q, k, v, call: AttnCall, need_lse: bool) -> list[str]:
    """The names of the installed flash-attn kernels that compute this call exactly (``run`` runs them)."""
    if torch.compiler.is_compiling():  # none while tracing: flash-attn's support depends on its version, and
        return []  # modules() imports them on its first call, which Dynamo cannot trace
    return [name for name in modules() if unfit_reason(name, q, k, v, call, need_lse) is None]


def run(name: str, q, k, v, call: AttnCall) -> tuple[torch.Tensor, None]:
    """The call on flash-attn ``name`` (``unfit_reason`` is None): ``(out (B, Q, Hq, D), None)``."""
    module = modules()[name]
    kw = dict(softmax_scale=call.scale, causal=call.causal, window_size=call.window or (-1, -1),
              softcap=call.softcap or 0.0)
    if call.alibi is not None:
        kw["alibi_slopes"] = call.alibi
    if call.cu_seqlens is None:
        out = module.flash_attn_func(q, k, v, **kw)
        return (out[0] if isinstance(out, tuple) else out), None  # some flash-attn 3 versions add the lse
    cu_q, cu_k = (c.to(torch.int32) for c in call.cu_seqlens)
    out = module.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, call.max_q, call.max_k, **kw)
    return out[None], None
