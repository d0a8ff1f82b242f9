"""CUDA-graph replay of the adaptive mode's inference calls.

The estimator, the selection and the sparse kernels are a dozen and more launches (~70, ~2 ms of host time, before
the selection kernels) whose host-side cost can exceed the GPU work, so an inference call of the Triton path
replays a graph captured once per call shape (inputs copied into its buffers). Set ``ENABLED = False`` to run
eagerly (tests compare both).
"""

from __future__ import annotations

import torch

from hf_ahfa.fastest import cuda_graph_capturing

ENABLED = True
_KEPT = 8  # graphs hold their own memory pools: keep the most recent shapes only
_graphs: dict = {}


def graphable(tensors) -> bool:
    """Whether a call on these tensors (``None`` entries ignored) may be captured and replayed."""
    tensors = [t for t in tensors if t is not None]
    # (tracing before the capture test, which Dynamo cannot trace)
    return (ENABLED and tensors[0].is_cuda and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling() and not cuda_graph_capturing())


def replay(fn, tensors, key):
    """``fn(*tensors)`` through a CUDA graph captured for ``key`` (which must also describe the tensors'
    shapes, strides and dtypes, and everything else ``fn`` depends on); ``None`` entries, in and out, pass through."""
    inputs = [t for t in tensors if t is not None]
    key = (tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs), tuple(t is None for t in tensors), key)
    entry = _graphs.pop(key, None)
    if entry is None:
        static = [t.clone() for t in inputs]  # clone keeps the strides (e.g. Transformers' transposed views)

        def run():
            it = iter(static)
            return fn(*(None if t is None else next(it) for t in tensors))

        device = inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()  # compiles and autotunes the kernels outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
        entry = (graph, static, outputs)
        while len(_graphs) >= _KEPT:
            _graphs.pop(next(iter(_graphs)))
    _graphs[key] = entry  # most recent last
    graph, static, outputs = entry
    for dst, src in zip(static, inputs):
        dst.copy_(src)
    graph.replay()
    return tuple(None if o is None else o.clone() for o in outputs)
