"""Context parallelism: attention over a sequence split across the ranks of a process group.

Two ways, both exact (and block-sparse where a policy says so):

* **Inside PyTorch's engine.** ``torch.distributed.tensor.experimental.context_parallel(mesh, buffers=...)`` (and
  accelerate's ``maybe_context_parallel``, which calls it) shards the buffers along the sequence (head-tail load
  balancing for causal) and replaces ``F.scaled_dot_product_attention`` by its ring for as long as it is active.
  Every ``hf_ahfa`` call made there (``hf_ahfa.attention``, a model with ``attn_implementation="ahfa"``) runs
  through the same engine: ``router.run`` sees the active context (``active_group``) and calls
  ``engine_attention``, which runs torch's ``_templated_ring_attention`` and ``_templated_ring_attention_backward``
  with ahfa's per-step ops: ``ring_step`` (``out``, ``lse`` of one step, merged by the engine by lse) and
  ``ring_step_backward`` (one step's ``dq, dk, dv`` from the merged out and lse: flash-attention's backward
  contract). K and V travel round the ring; no rank holds the whole sequence. That is the adapter: the engine
  takes any op of that contract but reaches it only through SDPA's aten ops, so ahfa calls it directly.
* **``ring_attention``**: K and V all-gathered (as torch's all-gather rotation and Llama 3's context parallelism
  do), each local query chunk run once over exactly the keys it may see: also windows, ALiBi, sinks and dropout,
  at the memory of the whole K and V on every rank.

PyTorch's engine is private and moves between versions (read in torch 2.13:
``torch/distributed/tensor/experimental/_context_parallel/_attention.py``; ``experimental/_attention.py`` is a stub
over it; the signature ``_templated_ring_attention(group, seq_dim, op, query, key, value, is_causal, **kwargs)``
changed since 2.4). Each step calls ``op(q, k, v, is_causal=bool) -> (out, logsumexp)`` in SDPA layout
``(B, H, T, D)``, lse ``(B, H, T)``. Its options are module globals (``_cp_options.enable_load_balance``: whether
the buffers were sharded head-tail; ``set_rotate_method``).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hf_ahfa import router
from hf_ahfa.api import attention
from hf_ahfa.spec import AttnCall, make_call

# arguments that index the whole sequence, which no rank holds
_WHOLE_SEQUENCE_ARGS = ("key_padding_mask", "attn_mask", "cu_seqlens", "layout")
# arguments that place a query by its offset in the key range: right for causal prefixes only
_POSITION_ARGS = ("window", "alibi_slopes")


def shard_sequence(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of ``x`` in the balanced causal ("head-tail") layout: of ``2 * world`` equal chunks along
    ``dim`` (the sequence: 1 for ``(B, T, H, D)``, 2 for lse ``(B, H, T)``), chunks ``rank`` and
    ``2 * world - 1 - rank``, so every rank has the same causal work (torch's ``_HeadTailLoadBalancer`` layout).

    Returns ``(..., T / world, ...)``. ``unshard_sequence`` undoes it across the group.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if x.shape[dim] % (2 * world):
        raise ValueError(f"x: sequence length {x.shape[dim]} (dim {dim}) must be divisible by 2 * world = "
                         f"{2 * world} for the balanced causal layout")
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def unshard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's ``shard_sequence`` part ``x``, in order (a collective over ``group``;
    differentiable: each rank gets the gradient of its own part)."""
    if x.shape[dim] % 2:
        raise ValueError(f"x: a shard_sequence part has two chunks of equal length, got {x.shape[dim]} (dim {dim})")
    group = _group(group)
    world = dist.get_world_size(group)
    parts = _Gather.apply(x, group, dim).chunk(world, dim=dim)
    heads = [p.chunk(2, dim=dim)[0] for p in parts]
    tails = [p.chunk(2, dim=dim)[1] for p in reversed(parts)]
    return torch.cat(heads + tails, dim=dim)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                   causal: bool = False, return_lse: bool = False, **attention_kwargs):
    """``hf_ahfa.attention`` over a sequence sharded across ``group``: this rank's queries against every rank's
    keys, exactly as one process would compute them on the whole sequence.

    Args:
        q: ``(B, Tq, Hq, D)``, this rank's queries.
        k: ``(B, Tk, Hkv, D)``, this rank's keys, ``Hq % Hkv == 0`` (GQA, never expanded); ``Tk`` equal on all ranks.
        v: ``(B, Tk, Hkv, Dv)``.
        group: the context-parallel process group; ``None``: the default group.
        causal: q and k sharded by ``shard_sequence`` (``Tq == Tk``, the whole length divisible by
            ``2 * world``). Bidirectional: any split of the keys, the queries' split is free.
        return_lse: also return the log-sum-exp ``(B, Hq, Tq)`` float32 over the whole sequence (no gradient).
        **attention_kwargs: passed to every ``hf_ahfa.attention`` call: ``scale``, ``softcap``, ``sinks``,
            ``dropout_p``, ``backend``, ``policy``; with ``causal`` also ``window`` and ``alibi_slopes``.

    Returns:
        ``out (B, Tq, Hq, Dv)`` (and ``lse``). K and V of the whole sequence are gathered on every rank; the
        backward sums their gradients back to the rank that owns each part; a tensor in ``attention_kwargs``
        (``sinks``) gets this rank's share of its gradient, to all-reduce like any parameter's.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name in _WHOLE_SEQUENCE_ARGS:
        if name in attention_kwargs:
            raise TypeError(f"ring_attention does not take {name}: it indexes the whole sequence, which no rank holds")
    if not causal:
        for name in _POSITION_ARGS:
            if attention_kwargs.get(name) is not None:
                raise ValueError(f"{name} needs causal=True in ring_attention (query positions are known there only)")
    if causal and (q.shape[1] != k.shape[1] or q.shape[1] % 2):
        raise ValueError(f"q, k: causal ring attention takes shard_sequence parts of equal, even length (two "
                         f"chunks per rank), got {q.shape[1]} queries and {k.shape[1]} keys")
    group = _group(group)
    if not causal:
        keys, values = _Gather.apply(k, group, 1), _Gather.apply(v, group, 1)
        return attention(q, keys, values, return_lse=return_lse, **attention_kwargs)

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    keys, values = unshard_sequence(k, group), unshard_sequence(v, group)
    n = q.shape[1] // 2
    # the head chunk is chunk `rank`, the tail chunk `2 * world - 1 - rank`: each sees the keys up to its own end,
    # and bottom-right alignment places its queries at the end of that prefix
    parts = [attention(q_part, keys[:, :(chunk + 1) * n], values[:, :(chunk + 1) * n], causal=True,
                       return_lse=return_lse, **attention_kwargs)
             for chunk, q_part in ((rank, q[:, :n]), (2 * world - 1 - rank, q[:, n:]))]
    if not return_lse:
        return torch.cat(parts, dim=1)
    outs, lses = zip(*parts)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def ring_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, is_causal: bool = False,
              **attention_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward step of torch's ring engine (``op`` of ``_templated_ring_attention``) through
    ``hf_ahfa.attention``.

    ``query (B, Hq, Q, D)``, ``key (B, Hkv, K, D)``, ``value (B, Hkv, K, Dv)`` (SDPA layout) ->
    ``out (B, Hq, Q, Dv)``, ``lse (B, Hq, Q)`` float32. No gradient (its lse has none): the engine's backward
    calls ``ring_step_backward``; ``engine_attention`` runs both.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        raise ValueError("ring_step has no gradient (its lse has none): run it under torch.no_grad() with "
                         "ring_step_backward for the backward, or call hf_ahfa.attention inside torch's "
                         "context_parallel(), which runs both")
    out, lse = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=is_causal,
                         return_lse=True, **attention_kwargs)
    return out.transpose(1, 2), lse


def ring_step_backward(*, grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       out: torch.Tensor, logsumexp: torch.Tensor, is_causal: bool = False, scale: float | None = None,
                       softcap: float | None = None, backend: str | None = None,
                       layout=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One backward step of torch's ring engine (``op`` of ``_templated_ring_attention_backward``): the gradients
    of this step's ``query``, ``key``, ``value`` (SDPA layout, as ``ring_step``) from ``grad_out`` and the merged
    ``out (B, Hq, Q, Dv)`` and ``logsumexp (B, Hq, Q)`` of every step. ``layout``: the ``BlockLayout`` the forward
    step ran (block-sparse), else exact. Triton kernels where ``backend`` resolves to them (CUDA), else the
    reference (``hf_ahfa.reference.reference_attention_backward``)."""
    q, k, v, d_out, o = (x.transpose(1, 2) for x in (query, key, value, grad_out, out))
    call = make_call(q, k, v, causal=is_causal, scale=scale, softcap=softcap, check_values=False)
    if router.choose_backend(q, router.requested_backend(backend)) == "triton":
        grads = _kernel_backward(d_out, q, k, v, o, logsumexp, call, layout)
    else:
        grads = _reference_backward(d_out, q, k, v, o, logsumexp, call, layout)
    return tuple(g.transpose(1, 2) for g in grads)


def _kernel_backward(d_out, q, k, v, out, lse, call: AttnCall, layout):
    from hf_ahfa.block_sparse import layout_band
    from hf_ahfa.kernels.flash import run_bwd

    a = call.kernel_args()
    args = (d_out, q, k, v, out, lse, None, None, None, None, None, call.max_q, call.max_k, a["causal"],
            a["win_left"], a["win_right"], a["softcap"], 0.0, 0, a["scale"])
    if layout is None:
        return run_bwd(*args)[:3]
    band = layout_band(call, layout.block_q, layout.block_k, call.max_q, call.max_k, q.device)
    r = layout.resolve(band, element_masks=False, backward=True)
    return run_bwd(*args, rows=(r.kv_count, r.kv_index, r.full_count, r.full_index),
                   cols=(r.q_count, r.q_index, r.full_q_count, r.full_q_index), blocks=(r.block_q, r.block_k))[:3]


def _reference_backward(d_out, q, k, v, out, lse, call: AttnCall, layout):
    from hf_ahfa.block_sparse import token_mask
    from hf_ahfa.masks import make_layout
    from hf_ahfa.reference import reference_attention_backward

    Q, K = q.shape[1], k.shape[1]
    if layout is not None:  # the layout's blocks as a token mask, as sparse_reference runs the forward
        call = call.replace(attn_mask=token_mask(layout.to_dense(), layout.block_q, layout.block_k, None, Q, K))
    return reference_attention_backward(d_out, q, k, v, out, lse, make_layout(Q, K, q.device), call)


# True inside one of the engine's steps: the step's hf_ahfa.attention call runs on this rank's tensors alone
_IN_STEP = contextvars.ContextVar("hf_ahfa_in_ring_step", default=False)


def active_group() -> dist.ProcessGroup | None:
    """The process group of torch's ``context_parallel()`` when one is active (it has replaced
    ``F.scaled_dot_product_attention`` by its ring), else ``None`` (also inside a ring step)."""
    if _IN_STEP.get() or not dist.is_available() or not dist.is_initialized():
        return None
    sdpa = F.scaled_dot_product_attention
    if not getattr(sdpa, "__module__", "").startswith("torch.distributed.tensor"):
        return None  # not replaced, or not by torch's context parallelism
    # the replacement closes over the mesh it was made for (torch 2.13's _distribute_function)
    cells = dict(zip(sdpa.__code__.co_freevars, (c.cell_contents for c in sdpa.__closure__ or ())))
    mesh = cells.get("device_mesh")
    if mesh is None or mesh.ndim != 1:
        raise RuntimeError(f"hf_ahfa runs inside torch's context_parallel() over the 1-D device mesh that its "
                           f"replacement of F.scaled_dot_product_attention keeps; torch {torch.__version__} keeps "
                           f"none there: call hf_ahfa.context_parallel.ring_attention with the process group instead")
    return mesh.get_group()


def _engine():
    """torch's ring engine module: the ``_context_parallel`` package where it exists (2.13), else the older
    module (the newer torch keeps that as a stub without the backward)."""
    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention
    except ImportError:
        from torch.distributed.tensor.experimental import _attention
    return _attention


def engine_attention(q, k, v, call: AttnCall, group: dist.ProcessGroup, *, backend: str | None = None,
                     policy=None, layout=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Q, Hq, Dv), lse (B, Hq, Q))`` of a call made inside torch's ``context_parallel()`` (what
    ``router.run`` does there): this rank's queries against the whole sequence, through torch's ring engine with
    ahfa's steps, differentiable in q, k and v. ``policy``: each step's keys are selected by the adaptive
    estimator against this rank's queries (the engine's steps never see the whole sequence), where the router
    would run that step block-sparse (``mode="auto"``: as selected, without its timing against exact attention);
    the backward reruns the selected blocks."""
    for name, present in (("key_padding_mask", call.key_padding_mask is not None),
                          ("attn_mask", call.attn_mask is not None), ("cu_seqlens", call.cu_seqlens is not None),
                          ("layout", layout is not None), ("sinks", call.sinks is not None),
                          ("dropout_p", call.dropout_p > 0), ("window", call.window is not None),
                          ("alibi_slopes", call.alibi is not None)):
        if present:
            raise ValueError(f"{name}: not supported inside torch's context_parallel() (each rank holds a part of "
                             "the sequence; masks, windows, ALiBi, sinks and dropout need whole-sequence positions "
                             "or one softmax): use hf_ahfa.context_parallel.ring_attention for them")
    if call.causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"q, k: a causal call inside context_parallel() takes this rank's part of one sequence "
                         f"for both, got {q.shape[1]} queries and {k.shape[1]} keys")
    steps = _Steps(call, backend, policy)
    return _EngineAttention.apply(q, k, v, group, steps)


class _Steps:
    """The engine's two ops for one call. The forward steps' layouts (``None``: exact) wait for the backward
    steps, which the engine runs in the same order over the same query and key parts."""

    def __init__(self, call: AttnCall, backend, policy):
        self.causal, self.scale, self.softcap = call.causal, call.scale, call.softcap
        self.backend, self.policy = backend, policy
        self.layouts = collections.deque()

    def forward(self, query, key, value, *, is_causal):
        layout = None
        if self.policy is not None:
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))
            call = make_call(q, k, v, causal=is_causal, scale=self.scale, softcap=self.softcap, check_values=False)
            if router.route(q, k, v, call, backend=self.backend, policy=self.policy, layout=None,
                            need_lse=True).path == "adaptive":
                from hf_ahfa.adaptive import estimate_layout

                layout = estimate_layout(q, k, self.policy, causal=is_causal, softcap=self.softcap, scale=self.scale,
                                         backend=self.backend)
        self.layouts.append(layout)
        return ring_step(query, key, value, is_causal=is_causal, scale=self.scale, softcap=self.softcap,
                         backend=self.backend, layout=layout)

    def backward(self, *, grad_out, query, key, value, out, logsumexp, is_causal):
        return ring_step_backward(grad_out=grad_out, query=query, key=key, value=value, out=out,
                                  logsumexp=logsumexp, is_causal=is_causal, scale=self.scale, softcap=self.softcap,
                                  backend=self.backend, layout=self.layouts.popleft())


class _EngineAttention(torch.autograd.Function):
    """torch's ring engine, forward and backward, over ahfa's steps; tensors in ahfa's ``(B, T, H, D)``."""

    @staticmethod
    def forward(ctx, q, k, v, group, steps: _Steps):
        sdpa = [x.transpose(1, 2) for x in (q, k, v)]
        with _engine_options(steps.causal):
            out, lse = _engine()._templated_ring_attention(group, 2, steps.forward, *sdpa, is_causal=steps.causal)
        ctx.save_for_backward(*sdpa, out, lse)
        ctx.group, ctx.steps = group, steps
        ctx.mark_non_differentiable(lse)
        return out.transpose(1, 2), lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse = ctx.saved_tensors
        with _engine_options(ctx.steps.causal):
            dq, dk, dv = _engine()._templated_ring_attention_backward(
                ctx.group, 2, ctx.steps.backward, grad_out.transpose(1, 2), "grad_out", query, key, value, out, lse,
                is_causal=ctx.steps.causal)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None


@contextlib.contextmanager
def _engine_options(causal: bool):
    """Inside the engine: our steps' own attention calls stay local (``_IN_STEP``), and a bidirectional call runs
    without the head-tail balance, which torch refuses for it (harmless: without a causal mask neither the order
    of the keys nor the split of the queries changes any row)."""
    token, options = _IN_STEP.set(True), _engine()._cp_options
    balance = options.enable_load_balance
    options.enable_load_balance = balance and causal
    try:
        with torch.no_grad():
            yield
    finally:
        options.enable_load_balance = balance
        _IN_STEP.reset(token)


def _group(group):
    if group is None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised (call torch.distributed.init_process_group "
                             "first, or pass a process group)")
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return group


class _Gather(torch.autograd.Function):
    """All-gather along ``dim`` in rank order; the backward sums every rank's gradient of this rank's part.
    (The list collectives: they run on gloo and NCCL alike, and are not deprecated in torch 2.13.)"""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        parts = [p.contiguous() for p in grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim)]
        mine = torch.empty_like(parts[0])
        dist.reduce_scatter(mine, parts, group=ctx.group)
        return mine, None, None
