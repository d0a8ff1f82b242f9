"""The launch-configuration choice (``kernels/tuning.py``): a configuration that does not fit the GPU is
skipped, timed or not; the choice is cached per key; other errors surface. Fake launches: no GPU needed."""

from __future__ import annotations

import pytest
import triton.testing
from triton.runtime.errors import OutOfResources, PTXASError

from hf_ahfa.kernels import tuning

BIG, MID, SMALL = (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2)


class FakeKernel:
    """Launches that fail like Triton's for configurations needing more than ``limit`` units of memory."""

    def __init__(self, limit, error=None):
        self.limit, self.error, self.launched = limit, error, []

    def __call__(self, cfg):
        if self.error:
            raise self.error
        if cfg[0] * cfg[1] * cfg[3] > self.limit:
            raise OutOfResources(cfg[0] * cfg[1] * cfg[3], self.limit, "shared memory")
        self.launched.append(cfg)


def _area(cfg):
    return cfg[0] * cfg[1]


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(tuning, "_chosen", {})


@pytest.mark.parametrize("autotune", [False, True])
def test_skips_what_does_not_fit_and_caches_per_key(monkeypatch, autotune):
    monkeypatch.setattr(tuning, "_AUTOTUNE", autotune)
    kernel = FakeKernel(limit=128 * 64 * 3)
    # timed: a configuration's time is its tile area, so the smallest tile that fits is the fastest
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **_: fn() or _area(kernel.launched[-1]))
    tuning.launch_tuned(("fwd", "mask"), [BIG, MID, SMALL], kernel)
    want = SMALL if autotune else MID  # untimed: the first that fits
    assert kernel.launched[-1] == want and tuning.chosen() == {"fwd/mask": want}
    kernel.launched.clear()
    tuning.launch_tuned(("fwd", "mask"), [BIG, MID, SMALL], kernel)  # cached: one launch, no search
    assert kernel.launched == [want]
    roomy = FakeKernel(limit=10**9)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **_: fn() or _area(roomy.launched[-1]))
    tuning.launch_tuned(("fwd", "no mask"), [BIG, MID, SMALL], roomy)  # another key chooses again
    assert roomy.launched[-1] == (SMALL if autotune else BIG)


@pytest.mark.parametrize("autotune", [False, True])
def test_nothing_fits_names_the_key_and_other_errors_surface(monkeypatch, autotune):
    monkeypatch.setattr(tuning, "_AUTOTUNE", autotune)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **_: fn() or 1.0)
    with pytest.raises(RuntimeError, match="no launch configuration .* fits this GPU \\(or compiles\\) for \\('bwd', 7\\)"):
        tuning.launch_tuned(("bwd", 7), [BIG, MID], FakeKernel(limit=1))
    with pytest.raises(ValueError, match="bad argument"):
        tuning.launch_tuned(("bwd", 8), [BIG, MID], FakeKernel(limit=10**9, error=ValueError("bad argument")))
    assert tuning.chosen() == {}


@pytest.mark.parametrize("autotune", [False, True])
def test_skips_a_configuration_ptxas_fails_on(monkeypatch, autotune, capsys, caplog):
    """ptxas (triton 3.6) crashes on a few forward variants at one configuration (GPU fuzz 133, 430, 434):
    the next configuration runs instead. Triton prints the kernel's whole PTX before it raises: held back, one
    warning names the candidate; what a candidate that compiles prints still comes out."""
    monkeypatch.setattr(tuning, "_AUTOTUNE", autotune)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    launched = []

    def launch(cfg):
        if cfg == BIG:
            print(".version 8.7\n.target sm_90a\nplease share the reproducer above with Triton project.")
            raise PTXASError("`ptxas` failed with error code -11\n`ptxas` stderr: ...")
        print(f"compiled {cfg}")
        launched.append(cfg)

    with caplog.at_level("WARNING", logger="hf_ahfa"):
        tuning.launch_tuned(("fwd", 1), [BIG, MID], launch)
    assert launched[-1] == MID and tuning._chosen[("fwd", 1)] == MID
    out = capsys.readouterr().out
    assert "reproducer" not in out and ".target" not in out and f"compiled {MID}" in out
    assert [r.getMessage() for r in caplog.records] == [
        f"hf_ahfa: ptxas failed on launch config {BIG} of ('fwd', 1) (skipped): PTXAS error: `ptxas` failed with "
        "error code -11"]


@pytest.mark.parametrize("autotune", [False, True])
def test_compile_output_of_other_failures(monkeypatch, autotune, capsys, caplog):
    """A candidate that does not fit the GPU's resources is skipped without a warning; any other error surfaces
    with what the compile printed before it."""
    monkeypatch.setattr(tuning, "_AUTOTUNE", autotune)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])

    def launch(cfg):
        print(f"compiling {cfg}")
        if cfg == BIG:
            raise OutOfResources(300_000, 232_448, "shared memory")
        raise ValueError("bad argument")

    with caplog.at_level("WARNING", logger="hf_ahfa"), pytest.raises(ValueError, match="bad argument"):
        tuning.launch_tuned(("fwd", 2), [BIG, MID], launch)
    assert capsys.readouterr().out == f"compiling {MID}\n" and caplog.records == []
