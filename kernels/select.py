"""Launch wrapper of the selection kernels, registered as the PyTorch op ``hf_ahfa::select_lists``."""

from __future__ import annotations

import torch

from hf_ahfa.kernels import configs
from hf_ahfa.kernels.common import next_power_of_2
from hf_ahfa.kernels.launch import launch
from hf_ahfa.kernels.select_kernels import compress_kernel, keep_blocks_kernel


@torch.library.custom_op("hf_ahfa::select_lists", mutates_args=(), device_types=("cuda", "cpu"))
def select_lists(
    tile_max: torch.Tensor, tile_sum: torch.Tensor, touched: torch.Tensor, full: torch.Tensor, anchors: torch.Tensor,
    limit: torch.Tensor, tau: float, rows_per_block: int, element_masks: bool, backward: bool,
) -> list[torch.Tensor]:
    """The adaptive selection of the estimator's tiles as ``BlockLayout`` lists (``hf_ahfa.select.select_blocks``
    is its reference; blocks tied at a row's threshold are all kept).

    ``tile_max``/``tile_sum`` ``(B, H, NR, NK)`` float32: ``hf_ahfa::estimate_tiles`` of the call's sampled rows,
    ``rows_per_block`` consecutive rows per query block; ``touched`` / ``full`` / ``anchors`` uint8 ``(NQ, NK)``:
    the blocks any query sees, those it sees whole (``band_blocks``), those always kept; ``limit`` a 0-d float32:
    a head keeping more blocks than it runs all its visible blocks. Returns ``[kv_count, kv_index, full_count,
    full_index]`` (``(B, H, NQ)`` and ``(B, H, NQ, NK)`` int32), with ``backward`` followed by the same four
    transposed (``(B, H, NK)``, ``(B, H, NK, NQ)``), then each head's kept blocks ``(B, H)`` int32. With
    ``element_masks`` no block is "full".
    """
    B, H, NR, NK = tile_max.shape
    NQ = touched.shape[0]
    keep = torch.empty(B, H, NQ, NK, dtype=torch.uint8, device=tile_max.device)
    kept = torch.zeros(B, H, dtype=torch.int32, device=tile_max.device)
    warps = 1 if configs.interpreting() else 4
    rows_p2, block = next_power_of_2(rows_per_block), next_power_of_2(NK)
    # the rows' masses stay in registers: ~32 values per thread at most (up to 16 warps)
    launch(keep_blocks_kernel, (NQ, B * H), (tile_max, tile_sum, touched, anchors, keep, kept, NR, NQ, NK, tau),
           dict(ROWS=rows_per_block, ROWS_P2=rows_p2, ALL=tau >= 1.0, BLOCK=block,
                num_warps=warps if warps == 1 else min(16, max(warps, rows_p2 * block // 1024))))
    # forward lists: per query block (row i of the grid); backward: per key block (column j)
    shapes = [(NQ, NK, NK, 1)] + ([(NK, NQ, 1, NK)] if backward else [])
    out = []
    for lines, n, s_line, s_entry in shapes:
        count, fcount = (torch.empty(B, H, lines, dtype=torch.int32, device=keep.device) for _ in range(2))
        index, findex = (torch.empty(B, H, lines, n, dtype=torch.int32, device=keep.device) for _ in range(2))
        launch(compress_kernel, (lines, B * H),
               (keep, touched, full, kept, limit, count, index, fcount, findex, NQ, NK, lines, n, s_line, s_entry),
               dict(ELEMENT_MASKS=element_masks, BLOCK=next_power_of_2(n), num_warps=warps))
        out += [count, index, fcount, findex]
    return [*out, kept]


@select_lists.register_fake
def _(tile_max, tile_sum, touched, full, anchors, limit, tau, rows_per_block, element_masks, backward):
    B, H, _, NK = tile_max.shape
    NQ = touched.shape[0]
    out = []
    for lines, n in [(NQ, NK)] + ([(NK, NQ)] if backward else []):
        count = tile_max.new_empty(B, H, lines, dtype=torch.int32)
        index = tile_max.new_empty(B, H, lines, n, dtype=torch.int32)
        out += [count, index, torch.empty_like(count), torch.empty_like(index)]
    return [*out, tile_max.new_empty(B, H, dtype=torch.int32)]
