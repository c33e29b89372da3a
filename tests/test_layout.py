import pytest
import torch
from hypothesis import given, settings

from strategies import layouts

from sparsevid import VideoLayout
from sparsevid.layout import auto_tile


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_permutation_round_trips_exactly(layout):
    perm, inverse = layout.perm, layout.inverse_perm
    assert perm.shape == (layout.num_blocks * layout.block_size,)
    real = perm[perm >= 0]
    assert torch.equal(real.sort().values, torch.arange(layout.num_tokens))  # each token exactly once
    assert torch.equal(perm[inverse], torch.arange(layout.num_tokens))
    x = torch.randn(2, layout.num_tokens, 3)
    tiles = layout.to_tiles(x, dim=1)
    assert torch.all(tiles[:, perm < 0] == 0)
    assert torch.equal(layout.from_tiles(tiles, dim=1), x)
    assert int(layout.block_tokens.sum()) == layout.num_tokens
    assert int(layout.is_text_block.sum()) == layout.num_text_blocks


@settings(max_examples=40, deadline=None)
@given(layouts())
def test_every_video_block_is_one_spatial_tile_of_one_frame(layout):
    F, H, W, T = layout.frames, layout.height, layout.width, layout.text_tokens
    offset = T if layout.text_first else 0
    th, tw = layout.tile
    slots = layout.perm.view(layout.num_blocks, layout.block_size)
    for block, coords in zip(slots, layout.block_coords.tolist()):
        tokens = block[block >= 0]
        if coords[0] < 0:  # text block: only text tokens
            text = (tokens < T) if layout.text_first else (tokens >= F * H * W)
            assert bool(text.all())
            continue
        f, ty, tx = coords
        local = tokens - offset
        assert bool((local // (H * W) == f).all())
        y, x = (local % (H * W)) // W, local % W
        assert bool(((y // th == ty) & (x // tw == tx)).all())
        # real tokens first, then padding
        assert bool((block[: len(tokens)] >= 0).all())


def test_auto_tile_minimises_padding_then_prefers_square():
    assert auto_tile(32, 32) == (8, 16)  # the DESIGN.md example: no padding
    assert auto_tile(30, 52) == (30, 4)  # Wan2.1 480p: 13 tiles of 120 tokens
    layout = VideoLayout(frames=21, height=30, width=52)
    assert layout.num_tokens == 32760 and layout.num_blocks == 273
    assert layout.num_tokens / layout.num_slots == pytest.approx(0.9375)


def test_ragged_edges_and_text_blocks():
    layout = VideoLayout(frames=1, height=5, width=7, text_tokens=20, tile=(4, 4), block_size=16)
    assert layout.block_tokens.tolist() == [16, 12, 4, 3, 16, 4]
    assert layout.perm[:16].tolist() == [0, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 17, 21, 22, 23, 24]
    assert layout.block_coords[-2:].tolist() == [[-1, -1, -1], [-1, -1, -1]]
