"""``hf_ahfa.nn``: a drop-in for ``torch.nn.MultiheadAttention`` that computes attention with ``hf_ahfa``.

For models outside Transformers (``torch.nn.Transformer*``, your own modules)::

    mha = hf_ahfa.nn.MultiheadAttention(256, 8, batch_first=True)   # same arguments as torch's
    out, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)  # routed by hf_ahfa.attention
    hf_ahfa.nn.replace_attention(model)                              # or swap every torch one in place

``MultiheadAttention`` subclasses ``torch.nn.MultiheadAttention``: the constructor, the parameters, their
initialisation and the state-dict keys are torch's own, so checkpoints load both ways. Only ``forward``
differs: the in-projection, ``add_bias_kv`` and ``add_zero_attn`` as torch does them, then
``hf_ahfa.attention`` on ``(B, T, H, D)`` views (or, for ``need_weights=True``, the PyTorch reference that
also returns the probabilities), then ``out_proj``.

Differences from torch's module (each tested in ``tests/test_nn.py``):

* A query row that sees no key (every key masked) gives zeros before ``out_proj`` (so the output is
  ``out_proj.bias``) and weights of 0; torch gives NaN there in its weights path.
* Float masks must be visibility masks: 0 where allowed, ``-inf`` where not. Other values (additive biases)
  raise ``ValueError``; torch adds them to the scores.
* ``is_causal=True`` without ``attn_mask`` applies the causal mask (query ``i`` sees keys ``j <= i``, aligned
  top-left as torch aligns it); torch raises ``RuntimeError`` there (and its inference fast path ignores
  the flag). With ``attn_mask`` the flag is a hint as in torch: without ``key_padding_mask`` and with
  ``need_weights=False`` the causal mask is applied instead of ``attn_mask``, otherwise ``attn_mask`` is.
* Bad arguments raise ``ValueError`` / ``TypeError`` naming the argument (torch: ``AssertionError`` or
  ``RuntimeError``). Nested tensors are not accepted; head dims are limited to 256 (``hf_ahfa.attention``).
* Dropout (training only) draws its mask from torch's RNG with ahfa's own sampling: the same distribution,
  not the same draws as torch's.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from hf_ahfa import telemetry
from hf_ahfa.api import attention
from hf_ahfa.masks import make_layout
from hf_ahfa.reference import reference_attention_probs
from hf_ahfa.spec import make_call

__all__ = ["MultiheadAttention", "replace_attention"]


def _run_own_forward(module, args):
    """A no-op forward pre-hook. ``torch.nn.TransformerEncoderLayer`` skips its fused inference kernel (which
    never calls ``self_attn.forward``) when a submodule has hooks, so that hooks run; this one makes it call
    our forward."""
    return None


def _keep_own_forward(mha: torch.nn.Module) -> None:
    if not any(hook is _run_own_forward for hook in mha._forward_pre_hooks.values()):
        mha.register_forward_pre_hook(_run_own_forward)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` computed by ``hf_ahfa.attention``.

    Args (as torch's):
        embed_dim: ``E``, the model dimension; ``num_heads`` heads of ``E // num_heads`` (at most 256).
        num_heads: number of heads.
        dropout: dropout on the attention probabilities (training only).
        bias: biases in the in- and out-projections.
        add_bias_kv: append a learned key ``bias_k`` and value ``bias_v`` (one extra key, visible to every query).
        add_zero_attn: append a key and a value of zeros (one more key, visible to every query).
        kdim, vdim: feature sizes of ``key`` and ``value`` (default ``E``); when either differs, the
            projections are ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` instead of ``in_proj_weight``.
        batch_first: inputs and output are ``(N, L, E)`` instead of ``(L, N, E)``.
        device, dtype: of the parameters.

    Parameters and state-dict keys: ``in_proj_weight (3E, E)`` or ``q_proj_weight (E, E)``,
    ``k_proj_weight (E, kdim)``, ``v_proj_weight (E, vdim)``; ``in_proj_bias (3E,)``; ``bias_k``, ``bias_v``
    ``(1, 1, E)``; ``out_proj.weight (E, E)``, ``out_proj.bias (E,)``: torch's, initialised as torch does.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first, device=device,
                         dtype=dtype)
        _keep_own_forward(self)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key``/``value``; ``L`` queries, ``S`` keys, batch ``N``, ``H`` heads.

        Args:
            query: ``(L, N, E)``, ``(N, L, E)`` with ``batch_first``, or ``(L, E)`` unbatched.
            key: ``(S, N, kdim)``, ``(N, S, kdim)`` with ``batch_first``, or ``(S, kdim)``.
            value: ``(S, N, vdim)``, ``(N, S, vdim)`` with ``batch_first``, or ``(S, vdim)``.
            key_padding_mask: ``(N, S)`` (``(S,)`` unbatched): bool, True = padding (ignored), or float,
                ``-inf`` = padding and 0 = attend (float masks are checked for other values: one host sync).
            need_weights: also return the attention probabilities (computed by the PyTorch reference,
                memory ``O(N * H * L * S)``); ``False`` runs the router's fastest exact path.
            attn_mask: ``(L, S)`` for every batch row and head, or ``(N * H, L, S)`` (``(H, L, S)``
                unbatched): bool, True = not allowed, or float, ``-inf`` = not allowed and 0 = allowed.
            average_attn_weights: average the returned weights over the heads.
            is_causal: query ``i`` sees keys ``j <= i``; a hint about ``attn_mask`` when one is given (see
                the module docstring).

        Returns:
            ``(output, weights)``: ``output`` shaped like ``query`` with ``E`` features; ``weights``
            ``(N, L, S')`` averaged or ``(N, H, L, S')`` per head (no ``N`` unbatched), ``S' = S`` plus one
            for ``add_bias_kv`` and one for ``add_zero_attn``, after dropout; ``None`` unless
            ``need_weights``.
        """
        batched = _check_inputs(self, query, key, value)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:  # (T, N, E) -> (N, T, E) views; keep `is` so the projection can be shared
            query, key, value = _transposed(query, key, value)
        N, L, _ = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        kpm = _key_padding_visible(key_padding_mask, N, S, batched, query.device)
        # torch: a causal hint replaces attn_mask where there is no key_padding_mask and no weights are asked
        # for; then the mask's shape is checked but its values are not read (L * S elements, a third of the
        # attention's own time at 16K tokens)
        hinted = is_causal and key_padding_mask is None and not need_weights
        mask = _attn_mask_visible(attn_mask, N, H, L, S, batched, query.device, read=not hinted)
        if kpm is not None and mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type "
                          "for both instead.", stacklevel=2)

        q, k, v = self._project(query, key, value)  # (N, L, E), (N, S, E), (N, S, E)
        if self.bias_k is not None and self.bias_v is not None:
            # (in the projections' dtype, which autocast may have lowered)
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(N, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(N, 1, -1)], dim=1)
        elif self.bias_k is not None or self.bias_v is not None:
            raise ValueError("bias_k and bias_v must be set together (add_bias_kv)")
        q, k, v = q.unflatten(-1, (H, D)), k.unflatten(-1, (H, D)), v.unflatten(-1, (H, D))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, H, D)], dim=1)
            v = torch.cat([v, v.new_zeros(N, 1, H, D)], dim=1)
        extra = k.shape[1] - S  # appended keys: visible to every query, as torch pads its masks
        if extra:
            kpm = None if kpm is None else F.pad(kpm, (0, extra), value=True)
            mask = None if mask is None else F.pad(mask, (0, extra), value=True)

        # torch: a causal hint replaces attn_mask only without key_padding_mask and weights
        if is_causal and (mask is None or (kpm is None and not need_weights)):
            causal, mask = _top_left_causal(L, k.shape[1], query.device)
        else:
            causal = False
        if kpm is not None and mask is not None:  # one mask: the CPU's SDPA route takes one
            mask, kpm = mask & kpm[:, None, None, :], None
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            out, weights = _with_weights(q, k, v, causal, dropout_p, kpm, mask)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = attention(q, k, v, causal=causal, dropout_p=dropout_p, key_padding_mask=kpm, attn_mask=mask)
            weights = None
        out = F.linear(out.flatten(2), self.out_proj.weight, self.out_proj.bias)  # (N, L, E)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value):
        """The in-projection, as torch's ``_in_projection_packed`` / ``_in_projection`` (one matmul when the
        inputs are one tensor)."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self.in_proj_weight is None:
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if query is key and key is value:
            return F.linear(query, w, b).chunk(3, dim=-1)
        wq, wk, wv = w.chunk(3)
        if key is value:
            kv = F.linear(key, w[E:], None if b is None else b[E:])
            return (F.linear(query, wq, bq), *kv.chunk(2, dim=-1))
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)


def _with_weights(q, k, v, causal, dropout_p, kpm, mask):
    """Output ``(N, L, H, D)`` and probabilities ``(N, H, L, S)`` from the reference (noted in ``record()``)."""
    call = make_call(q, k, v, causal=causal, dropout_p=dropout_p, key_padding_mask=kpm, attn_mask=mask)
    telemetry.note(q, k, path="exact", route="reference", backend="reference",
                   reason="need_weights")
    return reference_attention_probs(q, k, v, make_layout(q.shape[1], k.shape[1], q.device), call)


def _transposed(query, key, value):
    if query is key and key is value:
        query = key = value = query.transpose(0, 1)
    elif key is value:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
        value = key
    else:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    return query, key, value


def _top_left_causal(L: int, S: int, device) -> tuple[bool, torch.Tensor | None]:
    """torch's causal mask (query ``i`` sees keys ``j <= i``) as ``(causal, attn_mask)`` for hf_ahfa, whose
    causal flag aligns bottom-right: the same when ``L == S``."""
    if L == S:
        return True, None
    return False, torch.ones(L, S, dtype=torch.bool, device=device).tril()[None, None]


def _check_inputs(mha: MultiheadAttention, query, key, value) -> bool:
    """Shapes of query/key/value (errors name the argument); returns whether the input is batched."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise TypeError(
                f"{name} is a nested tensor, which hf_ahfa.nn.MultiheadAttention does not take; pass a padded "
                "tensor and key_padding_mask (for torch.nn.TransformerEncoder set use_nested_tensor=False, which "
                "hf_ahfa.nn.replace_attention does)")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"{name} must be {query.dim()}-D like query, got shape {tuple(t.shape)}")
    for name, t, dim in (("query", query, mha.embed_dim), ("key", key, mha.kdim), ("value", value, mha.vdim)):
        if t.shape[-1] != dim:
            raise ValueError(f"{name} must have {dim} features (last dim), got shape {tuple(t.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key and value must have the same sequence length and batch size, got shapes "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if query.dim() == 3:
        b = 0 if mha.batch_first else 1
        if query.shape[b] != key.shape[b]:
            raise ValueError(f"query and key must have the same batch size (dim {b} with batch_first="
                             f"{mha.batch_first}), got shapes {tuple(query.shape)} and {tuple(key.shape)}")
    return query.dim() == 3


def _visible_from(mask: torch.Tensor, name: str) -> torch.Tensor:
    """torch's mask (bool True = hidden, or float 0 / -inf) -> hf_ahfa's bool, True = visible."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    visible = mask == 0
    if not bool((visible | torch.isneginf(mask)).all()):
        raise ValueError(
            f"{name} holds values other than 0 and -inf: hf_ahfa.nn.MultiheadAttention takes visibility masks "
            "only (bool, or float 0 = attend / -inf = masked), not additive biases")
    return visible


def _key_padding_visible(mask, N, S, batched, device):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    expected = (N, S) if batched else (S,)
    if tuple(mask.shape) != expected:
        raise ValueError(f"key_padding_mask must have shape {expected} (batch, key length), got {tuple(mask.shape)}")
    return _visible_from(mask, "key_padding_mask").to(device).reshape(N, S)


def _attn_mask_visible(mask, N, H, L, S, batched, device, read=True):
    """``attn_mask`` as hf_ahfa's bool visibility mask (errors name the argument); ``read=False``: its type and
    shape are checked, ``None`` is returned."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    shape = tuple(mask.shape)
    if shape not in ((L, S), (N * H, L, S)):
        three = f"({N} * {H}, {L}, {S})" if batched else f"({H}, {L}, {S})"
        raise ValueError(f"attn_mask must have shape ({L}, {S}) (query length, key length) or {three} "
                         f"(batch * num_heads, ...), got {shape}")
    if not read:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"attn_mask must be a bool or floating-point tensor, got {mask.dtype}")
        return None
    ok = _visible_from(mask, "attn_mask")
    return (ok[None, None] if shape == (L, S) else ok.view(N, H, L, S)).to(device)


def replace_attention(module: torch.nn.Module) -> int:
    """Make every ``torch.nn.MultiheadAttention`` inside ``module`` (itself included) an
    ``hf_ahfa.nn.MultiheadAttention``, in place; returns how many were replaced.

    The modules stay the same objects with the same parameters (device, dtype, ``batch_first``, training
    flag, hooks, and optimizers holding the parameters stay valid): only their class changes. Subclasses of
    torch's module (ours included) are left alone. ``torch.nn.TransformerEncoderLayer`` and
    ``torch.nn.TransformerEncoder`` have inference fast paths that skip ``self_attn.forward``; a no-op
    forward pre-hook on each replaced module turns the layer's off, and ``use_nested_tensor`` is set to
    False on every ``TransformerEncoder`` whose layers use ours.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    count = 0
    for m in module.modules():
        if type(m) is torch.nn.MultiheadAttention:
            m.__class__ = MultiheadAttention
            _keep_own_forward(m)
            count += 1
    for m in module.modules():
        if isinstance(m, torch.nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), MultiheadAttention) for layer in m.layers):
            m.use_nested_tensor = False
    return count
