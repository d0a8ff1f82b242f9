"""Direct launches of compiled kernels (``kernels/launch.py``): a call runs through Triton the first time its
signature is seen and straight through the compiled kernel Triton returned afterwards; anything that changes what
Triton would compile (a pointer's 16-byte alignment, an int equal to 1 or divisible by 16, a value the heuristics
derive, a constexpr) goes through Triton again. Fake Triton kernels: no GPU needed (the direct path's GPU results
are the GPU tests')."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
import triton.language as tl
from triton.backends.compiler import BaseBackend
from triton.runtime.autotuner import Heuristics

from hf_ahfa.kernels import launch as launching


def body(X, N, S, BLOCK: tl.constexpr, F: tl.constexpr, EXTRA: tl.constexpr = 7):
    """The signature of the fake kernel (the body never runs)."""


def body_constexpr_first(BLOCK: tl.constexpr, X, F: tl.constexpr):
    """A kernel taking a constexpr positionally."""


class FakeJIT:
    """A ``JITFunction`` as ``launch`` sees it: ``params`` and ``run`` (Triton's bind, compile and launch), whose
    compiled kernels record their direct launches."""

    def __init__(self, fn):
        self.params = [SimpleNamespace(name=p.name, default=p.default, is_constexpr="constexpr" in str(p.annotation))
                       for p in inspect.signature(fn).parameters.values()]
        self.through_triton, self.direct = [], []

    def run(self, *args, grid, warmup, **kwargs):
        self.through_triton.append((grid, args, kwargs))
        return Compiled(self)


class Compiled:
    """A ``CompiledKernel``: ``compiled[grid](*every_argument)`` launches it."""

    def __init__(self, jit):
        self.jit = jit

    def __getitem__(self, grid):
        return lambda *args: self.jit.direct.append((grid, args))


@pytest.fixture
def direct(monkeypatch):
    """``launch`` as on a GPU: direct launches on, device 0, Triton's specializer with the base backend's rules."""
    monkeypatch.setattr(launching, "DIRECT", True)
    monkeypatch.setattr(launching, "interpreting", lambda: False)
    monkeypatch.setattr(launching, "driver", SimpleNamespace(active=SimpleNamespace(get_current_device=lambda: 0)))
    monkeypatch.setattr(launching, "_backends", {0: BaseBackend})
    monkeypatch.setattr(launching, "_compiled", {})
    monkeypatch.setattr(launching, "_kernels", {})


def fake_kernel(fn=body):
    jit = FakeJIT(fn)
    # F: whether S is positive, derived as a kernel's @triton.heuristics derives its flags
    return Heuristics(jit, [p.name for p in jit.params], dict(F=lambda a: a.get("S", 1) > 0)), jit


def test_second_call_of_a_signature_launches_the_compiled_kernel(direct):
    kernel, jit = fake_kernel()
    x = torch.zeros(64)
    launching.launch(kernel, (4, 2), (x, 17, 0.5), dict(BLOCK=32, num_warps=4))
    assert len(jit.through_triton) == 1 and jit.through_triton[0][2]["F"] is True and jit.direct == []
    y = torch.ones(64)  # another tensor, same alignment; another int that is neither 1 nor a multiple of 16
    launching.launch(kernel, (5, 2), (y, 19, 2.0), dict(BLOCK=32, num_warps=4))
    assert len(jit.through_triton) == 1
    # the grid padded to three dims; every parameter in signature order: the positional arguments, then the
    # constexprs given, derived and defaulted (launch options such as num_warps are not parameters)
    assert jit.direct == [((5, 2, 1), (y, 19, 2.0, 32, True, 7))]


@pytest.mark.parametrize("change", ["misaligned", "int 1", "int 16", "derived", "constexpr", "dtype"])
def test_what_triton_would_compile_differently_goes_through_triton(direct, change):
    kernel, jit = fake_kernel()
    x = torch.zeros(64)
    args, kwargs = (x, 17, 0.5), dict(BLOCK=32)
    launching.launch(kernel, (1,), args, kwargs)
    changed = {"misaligned": ((x[1:], 17, 0.5), kwargs), "int 1": ((x, 1, 0.5), kwargs),
               "int 16": ((x, 32, 0.5), kwargs), "derived": ((x, 17, -0.5), kwargs),
               "constexpr": (args, dict(BLOCK=64)), "dtype": ((x.half(), 17, 0.5), kwargs)}[change]
    launching.launch(kernel, (1,), *changed)
    assert len(jit.through_triton) == 2 and jit.direct == []
    launching.launch(kernel, (1,), *changed)  # now known: direct
    assert len(jit.through_triton) == 2 and len(jit.direct) == 1


def test_off_or_a_positional_constexpr_launches_through_triton_every_time(direct, monkeypatch):
    kernel, jit = fake_kernel(body_constexpr_first)
    for block in (32, 32):
        launching.launch(kernel, (1,), (block, torch.zeros(4)), {})
    assert len(jit.through_triton) == 2 and jit.direct == []
    monkeypatch.setattr(launching, "DIRECT", False)
    kernel, jit = fake_kernel()
    for _ in range(2):
        launching.launch(kernel, (1,), (torch.zeros(4), 3, 1.0), dict(BLOCK=16))
    assert len(jit.through_triton) == 2 and jit.direct == []
