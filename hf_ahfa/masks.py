"""Which keys a query may see: the one place that defines ahfa's mask semantics.

Every row (query) and column (key) gets a sequence id and a position inside its sequence. A query sees a
key when both belong to the same sequence and every active rule allows it:

* causal, aligned bottom-right: query ``i`` of a ``Q``-row sequence with ``K`` keys sits at position
  ``i + K - Q`` and sees keys at positions ``<= i + K - Q``;
* window ``(left, right)``: keys at positions ``p - left <= k <= p + right`` for a query at position ``p``
  (an int ``W`` means Transformers' ``sliding_window``: ``(W - 1, 0)`` causal, ``(W - 1, W - 1)`` not);
* ``key_padding_mask[b, k]`` and a dense boolean ``attn_mask[b, h, i, k]`` (True = visible).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Per-row and per-column coordinates of one attention call.

    ``q_seq``/``q_pos``: ``(Q,)`` sequence id and in-sequence position of each query row;
    ``k_seq``/``k_pos``: ``(K,)`` the same for each key column.
    """

    q_seq: torch.Tensor
    q_pos: torch.Tensor
    k_seq: torch.Tensor
    k_pos: torch.Tensor


def normalize_window(window, causal: bool) -> tuple[int, int] | None:
    """``None``, an int ``W`` or a ``(left, right)`` pair -> ``(left, right)`` or ``None`` (unbounded)."""
    if window is None:
        return None
    if isinstance(window, int):
        return (window - 1, 0 if causal else window - 1)
    left, right = window
    return (left, 0 if causal else right)


def hides_no_key(window: tuple[int, int], causal: bool, max_q: int, max_k: int) -> bool:
    """Whether a ``(left, right)`` window excludes no key of sequences of at most ``max_q`` queries and ``max_k``
    keys (queries bottom-right aligned): then it is no window (a sliding-window layer's decode over a cache no
    longer than the window, a prompt shorter than it)."""
    return window[0] >= max_k - 1 and (causal or window[1] >= max_q - 1)


def make_layout(
    q_len: int,
    k_len: int,
    device: torch.device,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> Layout:
    """Coordinates for a dense batch (one sequence per batch row) or a packed one (``cu_seqlens``)."""
    if cu_seqlens_q is None:
        q_pos = torch.arange(q_len, device=device) + (k_len - q_len)
        k_pos = torch.arange(k_len, device=device)
        return Layout(torch.zeros_like(q_pos), q_pos, torch.zeros_like(k_pos), k_pos)
    q_seq, q_off = _segments(cu_seqlens_q, q_len)
    k_seq, k_off = _segments(cu_seqlens_k, k_len)
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(device)
    k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(device)
    # bottom-right alignment inside each packed sequence
    q_pos = q_off + (k_lens - q_lens)[q_seq]
    return Layout(q_seq, q_pos, k_seq, k_off)


def _segments(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence id and offset inside the sequence for each of ``total`` packed rows."""
    idx = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), idx, right=True)
    return seq, idx - cu_seqlens[seq]


def positions_visible(qp: torch.Tensor, kp: torch.Tensor, *, causal: bool,
                      window: tuple[int, int] | None) -> torch.Tensor:
    """The positional rules on broadcastable query / key positions (in-sequence, bottom-right aligned)."""
    ok = torch.ones(torch.broadcast_shapes(qp.shape, kp.shape), dtype=torch.bool, device=qp.device)
    if causal:
        ok = ok & (kp <= qp)
    if window is not None:
        left, right = window
        ok = ok & (kp >= qp - left) & (kp <= qp + right)
    return ok


def visible(
    layout: Layout,
    rows: slice,
    cols: slice,
    *,
    causal: bool,
    window: tuple[int, int] | None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean visibility of the tile ``rows x cols``.

    Returns a tensor broadcastable to ``(B, H, len(rows), len(cols))``: ``(1, 1, R, C)`` when only the
    positional rules apply, with batch/head dims taken from ``key_padding_mask`` ``(B, K)`` and
    ``attn_mask`` ``(B|1, H|1, Q, K)`` when given.
    """
    ok = layout.q_seq[rows, None] == layout.k_seq[None, cols]
    ok = ok & positions_visible(layout.q_pos[rows, None], layout.k_pos[None, cols], causal=causal, window=window)
    ok = ok[None, None]
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, None, None, cols]
    if attn_mask is not None:
        ok = ok & attn_mask[:, :, rows, cols]
    return ok
