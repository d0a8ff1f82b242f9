"""Compile the Triton kernels that ``hf_ahfa.attention`` launches for a GPU target, on a machine without a GPU.

The CPU tests run the kernels under Triton's interpreter, which accepts code the GPU compiler refuses: with
triton 3.6 a tuple holding ``None`` inside a kernel ran on the interpreter and failed to compile on the H100
(kernels/NOTES.md). This script calls ``hf_ahfa.attention`` (forward, and backward where a variant trains) on
small CPU tensors with a stand-in Triton driver that reports a CUDA target and launches nothing: each kernel
variant goes through Triton's whole compile pipeline (TTIR, TTGIR, LLVM IR, PTX, ptxas) for that target. Nothing
is computed: outputs stay uninitialised, so only compile errors are checked, at each table's first launch config.
With ``--all-configs``, every entry of the forward and backward tables (``kernels/configs.py``, the float32 ones
too) is compiled pinned instead, and its shared memory checked against the architecture's limit per block (an
entry over it never runs).

    python scripts/compile_check.py                  # every variant, sm90
    python scripts/compile_check.py --arch 80 --variants causal,decode
    python scripts/compile_check.py --arch 80 --all-configs
    python scripts/compile_check.py --variants d256,d256_fp32   # Gemma-3's head dim; each kernel's compile time
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import types

import torch

COMPILED: list[tuple[str, int, float]] = []  # (kernel, shared memory bytes, seconds) of each launch of a variant
# the most shared memory one block may use (opt-in limit), by configs table: A100 163 KB, H100/H200 227 KB
SHARED_LIMIT = {"sm80": 163 * 1024, "sm90": 227 * 1024}
VARIANTS = ("causal", "full_d128", "window_softcap_sinks", "padding_mask", "dense_mask", "packed", "dropout",
            "alibi", "alibi_full", "block_sparse", "decode", "alibi_decode", "padding_decode", "adaptive")
# not in "all": Gemma-3's head dim, for the compile times each kernel prints (the float32 forward alone took ~37 s)
TIMING_VARIANTS = ("d256", "d256_window", "d256_fp32")


def _table(arch: int) -> str:
    """The ``kernels/configs.py`` table that a GPU of compute capability ``arch`` (x10) uses."""
    return "sm90" if arch >= 90 else "sm80"


def _stand_in_driver(arch: int) -> None:
    """Make Triton compile for ``sm<arch>`` and launch nothing; make hf_ahfa take CPU tensors as CUDA ones."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(Driver())
    run = JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):
        start = time.perf_counter()
        kernel = run(self, *a, grid=grid, warmup=True, **kw)
        COMPILED.append((self.__name__, kernel.metadata.shared, time.perf_counter() - start))
        return kernel

    JITFunction.run = compile_only

    from hf_ahfa.kernels import configs, flash, launch

    launch.DIRECT = False  # every call through Triton's run, which here compiles and launches nothing
    configs.arch = lambda device: _table(arch)
    flash.check_supported = lambda q: None
    # the split-KV decode sizes its splits by the SM count
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=132)


def _run(name: str) -> None:
    """One variant: forward (and backward where it trains) of ``hf_ahfa.attention`` on the Triton backend."""
    import hf_ahfa
    from hf_ahfa import patterns

    g = torch.Generator().manual_seed(0)
    B, T, H, HKV, D = 2, 256, 4, 2, 64
    if name == "full_d128":
        D = 128
    dtype = torch.bfloat16
    if name.startswith("d256"):  # Gemma-3's head dim (its fine-tune: bf16; a float32 model's forward: d256_fp32)
        D, dtype = 256, torch.float32 if name == "d256_fp32" else dtype
    make = lambda t, h: torch.randn(B, t, h, D, generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = make(T, H), make(T, HKV), make(T, HKV)
    kw: dict = dict(causal=True)
    if name == "full_d128":
        kw = dict(causal=False)
    elif name == "d256_window":
        kw.update(window=64)
    elif name == "d256_fp32":  # a float32 model's forward (no training in float32 here)
        q, k, v = (x.detach() for x in (q, k, v))
    elif name == "window_softcap_sinks":
        kw.update(window=64, softcap=30.0, sinks=torch.zeros(H, requires_grad=True))
    elif name == "padding_mask":
        kpm = torch.ones(B, T, dtype=torch.bool)
        kpm[0, :17] = False
        kw.update(key_padding_mask=kpm)
    elif name == "dense_mask":
        kw.update(attn_mask=torch.rand(B, 1, T, T, generator=g) > 0.2)
    elif name == "packed":
        q, k, v = (x.detach()[:1].requires_grad_() for x in (q, k, v))
        kw.update(cu_seqlens=torch.tensor([0, 100, 256], dtype=torch.int32))
    elif name == "dropout":
        kw.update(dropout_p=0.1)
    elif name in ("alibi", "alibi_full"):  # alibi_full: bidirectional (the distance form in every kernel)
        kw.update(alibi_slopes=torch.rand(H, generator=g), causal=name == "alibi")
    elif name == "block_sparse":
        kw.update(layout=patterns.local(T, T, block=64, width=1, batch=B, heads=H))
    elif name in ("decode", "alibi_decode", "padding_decode"):  # one query over a long cache: split-KV + combine
        q = q.detach()[:, :1]
        k, v = (torch.randn(B, 8192, HKV, D, generator=g).to(dtype) for _ in range(2))
        if name == "alibi_decode":
            kw.update(alibi_slopes=torch.rand(H, generator=g))
        if name == "padding_decode":  # left padding: a visible span in one run
            kpm = torch.ones(B, 8192, dtype=torch.bool)
            kpm[0, :100] = False
            kw.update(key_padding_mask=kpm)
    elif name == "adaptive":  # the estimator's kernels, then the block-sparse forward
        q, k, v = (torch.randn(1, 4096, h, D, generator=g).to(dtype) for h in (H, HKV, HKV))
        kw.update(policy=hf_ahfa.AdaptivePolicy(mode="adaptive", min_length=1024))
    else:
        assert name in ("causal", "d256"), name
    out = hf_ahfa.attention(q, k, v, backend="triton", **kw)
    if out.requires_grad:
        out.sum().backward()


def _table_entries(arch: int) -> int:
    """Every launch config of the forward and backward tables pinned in turn (causal fwd+bwd at its head dim):
    compiled, and its kernels' shared memory within ``SHARED_LIMIT``. Returns the number of failures."""
    import hf_ahfa
    from hf_ahfa.kernels import configs, tuning

    name = _table(arch)
    limit = SHARED_LIMIT[name]
    failed = 0
    for table_name, prefix in (("FWD", "flash_fwd"), ("BWD", "flash_bwd"), ("FWD_FLOAT32", "flash_fwd"),
                               ("BWD_FLOAT32", "flash_bwd")):
        table = getattr(configs, table_name)[name]
        dtype = torch.float32 if table_name.endswith("FLOAT32") else torch.bfloat16
        for head_dim, entries in table.items():
            for cfg in entries:
                table[head_dim] = [cfg]
                tuning._chosen.clear()  # as the GPU test pinning each entry does
                COMPILED.clear()
                q = torch.randn(1, 256, 2, head_dim, dtype=dtype, requires_grad=True)
                try:
                    hf_ahfa.attention(q, q, q, causal=True, backend="triton").sum().backward()
                    used = {k: b for k, b, _ in COMPILED if k.startswith(prefix)}
                    over = {k: b for k, b in used.items() if b > limit}
                    sizes = ", ".join(f"{k} {b // 1024} KB" for k, b in used.items())
                    print(f"{'FAILED' if over else 'ok    '}  {name} {table_name} D={head_dim} {cfg}: {sizes}"
                          + (f" (over {limit // 1024} KB)" if over else ""), flush=True)
                    failed += bool(over) or not used
                except Exception as err:  # noqa: BLE001
                    failed += 1
                    print(f"FAILED  {name} {table_name} D={head_dim} {cfg}: {type(err).__name__}: {str(err)[-800:]}",
                          flush=True)
            table[head_dim] = entries
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 to compile for (default: 90)")
    ap.add_argument("--variants", default="all",
                    help=f"all, or some of {', '.join(VARIANTS + TIMING_VARIANTS)} (comma-separated)")
    ap.add_argument("--all-configs", action="store_true",
                    help="instead of the variants: every launch config of the fwd/bwd tables, shared memory checked")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    names = VARIANTS if args.variants == "all" else tuple(args.variants.split(","))
    unknown = set(names) - set(VARIANTS + TIMING_VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; expected some of {', '.join(VARIANTS + TIMING_VARIANTS)}")
    os.environ.setdefault("AHFA_AUTOTUNE", "0")  # each table's first config: a timed choice needs a GPU
    _stand_in_driver(args.arch)
    if args.all_configs:
        return 1 if _table_entries(args.arch) else 0
    failed = []
    for name in names:
        start = time.perf_counter()
        COMPILED.clear()
        try:
            _run(name)
            if not COMPILED:
                raise RuntimeError("no Triton kernel was launched")
            seconds: dict[str, float] = {}  # compile time per kernel (0 where Triton's cache had it)
            for kernel, _, took in COMPILED:
                seconds[kernel] = seconds.get(kernel, 0.0) + took
            kernels = ", ".join(f"{kernel} {took:.0f} s" for kernel, took in seconds.items())
            print(f"ok      sm{args.arch} {name} ({time.perf_counter() - start:.0f} s): {kernels}", flush=True)
        except Exception as err:  # noqa: BLE001  (report every variant, then fail)
            failed.append(name)
            print(f"FAILED  sm{args.arch} {name}: {type(err).__name__}", flush=True)
            traceback.print_exc()  # with its cause: a Triton CompilationError's own message shows only the outer call
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
