"""The block-sparse layout: compression round trips, expansion, density, causal tiles."""

from __future__ import annotations

import pytest
import torch

from hf_ahfa.block_layout import BlockLayout, band_blocks


@pytest.mark.parametrize("q_len,k_len,bq,bk", [(64, 64, 16, 16), (97, 130, 32, 16), (1, 1025, 16, 128)])
def test_round_trip_and_expansion(q_len, k_len, bq, bk):
    nq, nk = -(-q_len // bq), -(-k_len // bk)
    g = torch.Generator().manual_seed(q_len + k_len)
    blocks = torch.rand(2, 3, nq, nk, generator=g) < 0.4
    full = blocks & (torch.rand(2, 3, nq, nk, generator=g) < 0.5)
    layout = BlockLayout.from_dense(blocks, bq, bk, q_len, k_len, full=full)
    assert layout.shape == (2, 3, nq, nk)
    assert torch.equal(layout.to_dense(), blocks) and torch.equal(layout.to_dense(full=True), full)
    assert torch.equal(layout.to_dense(full=False), blocks & ~full)
    # as FlexAttention's BlockMask: the first list holds the blocks that need the mask, the second the rest
    assert torch.equal(layout.kv_count, (blocks & ~full).sum(-1).int())
    assert torch.equal(layout.full_count, full.sum(-1).int())
    # indices ascending in the used slots, padded with NK after them
    used = torch.arange(nk) < layout.kv_count[..., None]
    assert (layout.kv_index[~used] == nk).all()
    assert (layout.kv_index[..., 1:] >= layout.kv_index[..., :-1]).all()
    token = layout.to_token_mask()
    assert token.shape == (2, 3, q_len, k_len)
    i, j = torch.randint(0, q_len, (50,), generator=g), torch.randint(0, k_len, (50,), generator=g)
    assert torch.equal(token[1, 2, i, j], blocks[1, 2, i // bq, j // bk])
    assert layout.density() == pytest.approx(blocks.float().mean().item())


@pytest.mark.parametrize("q_len,k_len", [(64, 64), (50, 130), (1, 77)])
def test_causal_tiles_cover_the_causal_mask(q_len, k_len):
    touched, full = band_blocks(torch.tensor([q_len]), torch.tensor([k_len]), 16, 32, -(-q_len // 16), -(-k_len // 32),
                                causal=True, window=None)
    layout = BlockLayout.from_dense(touched, 16, 32, q_len, k_len, full=full)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    tokens = layout.to_token_mask()[0, 0]
    assert not (causal & ~tokens).any()  # every visible pair lies in a selected tile
    full_tokens = BlockLayout.from_dense(full, 16, 32, q_len, k_len).to_token_mask()[0, 0]
    assert not (full_tokens & ~causal).any()  # full tiles need no element mask
    assert layout.density(allowed=touched) == 1.0
    half = touched.clone()
    half[..., -1, :] = False  # drop the last query block's tiles
    assert BlockLayout.from_dense(half, 16, 32, q_len, k_len).density(allowed=touched) < 1.0


def test_bad_input():
    with pytest.raises(ValueError, match=r"blocks must be a bool \(B, H, 4, 2\)"):
        BlockLayout.from_dense(torch.ones(1, 1, 4, 3, dtype=torch.bool), 16, 32, 64, 64)
    blocks = torch.zeros(1, 1, 4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="subset"):
        BlockLayout.from_dense(blocks, 16, 32, 64, 64, full=~blocks)
    with pytest.raises(ValueError, match="no full blocks"):
        BlockLayout.from_dense(blocks, 16, 32, 64, 64).to_dense(full=True)


def test_resolve_fits_the_layout_to_a_call():
    # a causal call of 50 queries over 70 keys in 16x16 blocks: tiles above the diagonal are dropped, tiles
    # wholly below it need no mask (unless element masks apply), and the transposed lists mirror the rows
    q_len, k_len, bs = 50, 70, 16
    nq, nk = -(-q_len // bs), -(-k_len // bs)
    g = torch.Generator().manual_seed(5)
    blocks = torch.rand(2, 3, nq, nk, generator=g) < 0.7
    band = band_blocks(torch.tensor([q_len] * 2), torch.tensor([k_len] * 2), bs, bs, nq, nk, True, None)
    touched, full = band
    layout = BlockLayout.from_dense(blocks, bs, bs, q_len, k_len)
    r = layout.resolve(band, element_masks=False, backward=True)
    assert torch.equal(r.to_dense(), blocks & touched)
    assert torch.equal(r.to_dense(full=True), blocks & full)
    for rows, cols in (((r.kv_count, r.kv_index), (r.q_count, r.q_index)),
                       ((r.full_count, r.full_index), (r.full_q_count, r.full_q_index))):
        by_row = BlockLayout(*rows, bs, bs, q_len, k_len).to_dense()
        by_col = BlockLayout(*cols, bs, bs, k_len, q_len).to_dense()
        assert torch.equal(by_row, by_col.transpose(-1, -2))
    masked = layout.resolve(band, element_masks=True, backward=False)
    assert not masked.to_dense(full=True).any() and masked.q_count is None
    assert torch.equal(masked.to_dense(), blocks & touched)
