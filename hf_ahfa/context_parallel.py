"""Context parallelism: attention over a sequence split across the ranks of a process group.

PyTorch's engine (read in torch 2.13; ``torch/distributed/tensor/experimental/_context_parallel/_attention.py``,
with ``experimental/_attention.py`` kept as a stub over it): ``context_parallel(mesh, buffers=...)`` shards the
buffers (head-tail load balancing for causal) and reroutes the aten ops ``_scaled_dot_product_{flash,efficient,
cudnn}_attention[_backward]`` to the private ``_templated_ring_attention(group, seq_dim, op, query, key, value,
is_causal, **kwargs)`` (signature changed since 2.4: ``(mesh, op, ...)``, ``(mesh, seq_dim, op, ...)``). Each step
calls ``op(q, k, v, is_causal=bool, **kwargs) -> (out, logsumexp, *rest)`` in SDPA layout (B, H, T, D), lse
(B, H, T); ``_SDPAMerger`` merges the steps by lse. The backward, ``_templated_ring_attention_backward``, needs an
op that computes one step's dq, dk, dv from the merged out and lse (flash-attention's contract). Options are module
globals (``_cp_options.enable_load_balance`` must be False for non-causal calls, ``set_rotate_method``).

A custom op plugs into the forward (``ring_step``: prefill), not into training: ``hf_ahfa.attention``'s lse has no
gradient and it has no public backward from a given out and lse, so an lse merge differentiated by autograd gets
dq and dk wrong. ``ring_attention`` therefore gathers K and V over the group (as torch's default all-gather
rotation and Llama 3's context parallelism do) and runs each local query chunk once over exactly the keys it may
see: exact out and lse without a merge, gradients through autograd of ``hf_ahfa.attention``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_ahfa.api import attention

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
    """One step of torch's ring engine (``op`` of ``_templated_ring_attention``) through ``hf_ahfa.attention``.

    ``query (B, Hq, Q, D)``, ``key (B, Hkv, K, D)``, ``value (B, Hkv, K, Dv)`` (SDPA layout) ->
    ``out (B, Hq, Q, Dv)``, ``lse (B, Hq, Q)`` float32. Forward only: the engine's merge needs the gradient of the
    lse, which ``hf_ahfa.attention`` does not give; train with ``ring_attention``.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        raise ValueError("ring_step is forward only (its lse has no gradient): run it under torch.no_grad(), "
                         "or use ring_attention for training")
    out, lse = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=is_causal,
                         return_lse=True, **attention_kwargs)
    return out.transpose(1, 2), lse


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
