import math

import pytest
import torch
from hypothesis import given, settings

from strategies import layouts

from sparsevid import VideoLayout
from sparsevid.layout import auto_tile


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_permutation_round_trips_exactly_and_pads_only_the_tail(layout):
    perm, inverse, L = layout.perm, layout.inverse_perm, layout.num_tokens
    assert perm.shape == (layout.num_blocks * layout.block_size,)
    assert layout.num_blocks == math.ceil(L / layout.block_size)
    assert torch.equal(perm[:L].sort().values, torch.arange(L))  # each token exactly once, no gap inside
    assert bool((perm[L:] == -1).all())  # only a short last block has missing slots
    assert torch.equal(perm[inverse], torch.arange(L))
    x = torch.randn(2, L, 3)
    tiles = layout.to_tiles(x, dim=1)
    assert torch.all(tiles[:, perm < 0] == 0)
    assert torch.equal(layout.from_tiles(tiles, dim=1), x)
    assert torch.equal(layout.from_tiles(tiles[:, :L], dim=1), x)  # the unpadded tile order works too
    tokens = layout.block_tokens
    assert int(tokens.sum()) == L and bool((tokens[:-1] == layout.block_size).all())


@settings(max_examples=40, deadline=None)
@given(layouts())
def test_tile_order_groups_each_tile_and_keeps_text_contiguous(layout):
    F, H, W, T, L = layout.frames, layout.height, layout.width, layout.text_tokens, layout.num_tokens
    V = F * H * W
    offset = T if layout.text_first else 0
    th, tw = layout.tile
    order = layout.perm[:L]
    text_slots = slice(0, T) if layout.text_first else slice(V, L)
    video_slots = slice(T, L) if layout.text_first else slice(0, V)
    text = order[text_slots]
    assert torch.equal(text, torch.arange(T) + (0 if layout.text_first else V))
    local = order[video_slots] - offset
    f, y, x = local // (H * W), (local % (H * W)) // W, local % W
    nty, ntx = layout.tiles_per_frame
    key = (((f * nty + y // th) * ntx + x // tw) * th + y % th) * tw + x % tw  # (tile, row-major in tile)
    assert bool((key[1:] > key[:-1]).all())
    # a text block holds a text token; a block's centre is the mean of its video tokens' coordinates
    block = torch.arange(L) // layout.block_size
    expected_text = torch.zeros(layout.num_blocks, dtype=torch.bool)
    expected_text[block[text_slots]] = True
    assert torch.equal(layout.is_text_block, expected_text)
    coords = torch.stack([f, y, x], -1).double()
    for b in range(layout.num_blocks):
        in_block = block[video_slots] == b
        centre = layout.block_centers[b]
        if in_block.any():
            assert torch.allclose(centre, coords[in_block].mean(0))
        else:
            assert bool(centre.isnan().all())


def test_auto_tile_minimises_tiles_then_prefers_square():
    assert auto_tile(32, 32) == (8, 16)  # the DESIGN.md example: every block is one tile
    assert auto_tile(30, 52) == (30, 4)  # Wan2.1 480p: 13 strips of 120 tokens per frame
    layout = VideoLayout(frames=21, height=30, width=52)
    assert layout.num_tokens == 32760 and layout.num_blocks == 256  # 255 full blocks and one of 120
    assert layout.block_tokens[-1] == 120


def test_ragged_edges_straddle_and_text_blocks():
    layout = VideoLayout(frames=1, height=5, width=7, text_tokens=20, tile=(4, 4), block_size=16)
    assert layout.block_tokens.tolist() == [16, 16, 16, 7]
    # block 0 is exactly the 4x4 tile (0, 0)
    assert layout.perm[:16].tolist() == [0, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 17, 21, 22, 23, 24]
    # block 1: the 4x3 tile (0,1), then the first 4 tokens of the 1x4 tile (1,0)
    assert layout.perm[16:32].tolist() == [4, 5, 6, 11, 12, 13, 18, 19, 20, 25, 26, 27, 28, 29, 30, 31]
    assert layout.is_text_block.tolist() == [False, False, True, True]  # block 2 mixes video and text
    assert layout.perm[-9:].tolist() == [-1] * 9
    assert torch.isnan(layout.block_centers[3]).all() and not torch.isnan(layout.block_centers[2]).any()


@pytest.mark.parametrize("tile", [(2.5, 4), (True, 4), ("2", 4)])
def test_tile_must_be_ints(tile):
    with pytest.raises(TypeError, match="tile"):
        VideoLayout(frames=1, height=5, width=7, tile=tile, block_size=16)
