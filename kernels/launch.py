"""Kernel launches that skip Triton's argument binding once a call's compiled kernel is known.

``kernel[grid](*args, **kwargs)`` binds every argument, runs the kernel's heuristics, specializes the arguments
and hashes the whole specialization (constexprs included) on every call before Triton's C launcher runs: much of
the host time of a launch of the flash kernels, whose calls are host-bound below ~8K tokens in a model
(kernels/NOTES.md). ``launch`` runs a call through Triton once, keeps the compiled kernel Triton returned, and
launches it directly (``CompiledKernel[grid](*all_arguments)``, Triton's own launcher) for later calls that would
compile to the same kernel. The key is everything Triton's compiled-kernel cache key is made of, computed more
cheaply: the current device; the constexpr keyword arguments (``BLOCK_M``, ``num_warps``, ...); the values the
kernel's ``@triton.heuristics`` derive, as Triton derives them; and the positional arguments' specialization by
Triton's own ``native_specialize_impl`` (dtypes; 16-byte alignment of pointers; ints equal to 1, divisible by 16,
or past 32 bits; ``None``), taken at its finest (a parameter that opts out of specialization only makes Triton's
key coarser than ours). Globals that decide a variant (``common.NAN_GUARD``, ``TMA``, ``ALIBI_FORM``) reach the
kernels as constexpr arguments or through the heuristics, so they are in the key.

Not done on this path: Triton's pre-run hooks and its check that a global a kernel reads has not changed since it
was compiled (ours read constants fixed at import, such as ``common.LOG2E``). ``AHFA_DIRECT_LAUNCH=0`` launches through Triton every
time (for comparisons); the interpreter always does, and so does a Triton older than 3.6 (no native specializer).
"""

from __future__ import annotations

import os

from triton.compiler.compiler import make_backend
from triton.runtime import driver
from triton.runtime.autotuner import Heuristics

from hf_ahfa.kernels.configs import interpreting

try:  # (triton 3.6+: older releases specialize in Python, launched through Triton every time)
    from triton._C.libtriton import native_specialize_impl
except ImportError:
    native_specialize_impl = None

DIRECT = os.environ.get("AHFA_DIRECT_LAUNCH", "1") != "0" and native_specialize_impl is not None

# (kernel, device, constexpr and derived values, specialization) -> (CompiledKernel, the arguments after the
# positional ones in signature order), or None where the kernel takes a constexpr positionally (its value would
# need to be in the key: launched through Triton)
_compiled: dict[tuple, tuple | None] = {}
_kernels: dict[object, tuple] = {}  # kernel -> (its @triton.heuristics wrappers outermost first, its JITFunction)
_backends: dict[int, object] = {}  # device -> Triton backend (the specializer's target)


def launch(kernel, grid: tuple, args: tuple, kwargs: dict):
    """``kernel[grid](*args, **kwargs)``, directly through the compiled kernel once the same call signature has
    run through Triton (module docstring). ``kernel``: a ``@triton.jit`` function, possibly under
    ``@triton.heuristics``; ``args``: its leading parameters, none of them a constexpr; ``kwargs``: the rest that
    are given (constexprs and launch options)."""
    if not DIRECT or interpreting():
        return kernel[grid](*args, **kwargs)
    wrappers, jit = _kernels.get(kernel) or _inspect(kernel)
    named = kwargs
    for heuristics in wrappers:  # as Triton's Heuristics.run derives them, in the same order
        named = dict(named)
        full = {**dict(zip(heuristics.arg_names, args)), **named}
        for name, derive in heuristics.values.items():
            named[name] = derive(full)
    device = driver.active.get_current_device()
    key = (kernel, device, tuple(named.items()), _specialize(device, args))
    entry = _compiled.get(key, False)
    if entry is False:  # first call of this signature: Triton binds, compiles or finds the kernel, and launches
        compiled = kernel[grid](*args, **kwargs)
        positional = jit.params[:len(args)]
        _compiled[key] = None if compiled is None or any(p.is_constexpr for p in positional) else (
            compiled, tuple(named.get(p.name, p.default) for p in jit.params[len(args):]))
        return compiled
    if entry is None:
        return kernel[grid](*args, **kwargs)
    compiled, tail = entry
    compiled[(*grid, 1, 1)[:3]](*args, *tail)
    return compiled


def _inspect(kernel) -> tuple:
    wrappers, jit = [], kernel
    while isinstance(jit, Heuristics):
        wrappers.append(jit)
        jit = jit.fn
    _kernels[kernel] = (tuple(wrappers), jit)
    return _kernels[kernel]


def _specialize(device: int, args: tuple) -> tuple:
    """Triton's specialization of ``args`` (types and attributes, nested like the arguments)."""
    backend = _backends.get(device)
    if backend is None:
        backend = _backends[device] = make_backend(driver.active.get_current_target())
    return native_specialize_impl(backend, args, False, True, True)
