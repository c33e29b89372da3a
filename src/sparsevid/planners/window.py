"""``window``: a static spatio-temporal neighbourhood of tiles (sliding-tile style), content-blind."""

from __future__ import annotations

import math
import numbers

import torch

from ..kernels.csr import dense_to_csr
from ..plan import BlockPlan
from . import register_planner
from ._select import _DEFAULT_DENSITY, forced_blocks, keep_by_budget


@register_planner("window", default=("density", _DEFAULT_DENSITY))
def window(
    q, k, layout, *, density=None, mass=None, radius: tuple[int, int, int] | None = None, frame_weight: float = 4.0
) -> BlockPlan:
    """Key blocks near each query block in time and space; one broadcast ``(1, 1)`` plan for all heads.

    Options:
        radius (tuple): ``(frames, tile rows, tile columns)``: keep the key blocks whose centre is
            within this distance of the query block's centre on every axis (plus half a tile: a
            block may straddle two tiles). Exclusive with ``density``.
        frame_weight (float): finite, >= 0; with ``density``, blocks are ranked by Chebyshev distance between
            block centres in token units, one frame counting as ``frame_weight`` tokens of
            displacement (Euclidean distance breaks ties), and each query block keeps the nearest.
    """
    if mass is not None:
        raise ValueError("Expect density or radius for method 'window' (it is static) but got mass")
    if isinstance(frame_weight, bool) or not isinstance(frame_weight, numbers.Real):
        raise TypeError(f"Expect frame_weight to be a float but got {frame_weight!r}")
    if not (math.isfinite(frame_weight) and frame_weight >= 0):  # NaN ranked every block alike
        raise ValueError(f"Expect frame_weight to be a finite float >= 0 but got {frame_weight}")
    centers = layout.on(q.device).block_centers  # (NB, 3) token units; NaN: text-only block
    video = ~centers[:, 0].isnan()
    pair_video = video[:, None] & video[None, :]
    th, tw = layout.tile
    delta = (centers[:, None, :] - centers[None, :, :]).abs().nan_to_num(0.0)  # (NB, NB, 3)
    df, dy, dx = delta.unbind(-1)  # scalars only below: no host-to-device copy (and so no sync) per plan
    if radius is not None:
        if density is not None:
            raise ValueError("Expect one of radius or density for method 'window' but got both")
        if not (
            isinstance(radius, (tuple, list))
            and len(radius) == 3
            and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in radius)
        ):
            raise ValueError(f"Expect radius=(frames, tile_rows, tile_cols) of ints >= 0 but got {radius!r}")
        # in (frames, tile rows, tile columns); half a tile of slack for blocks that straddle two tiles
        rf, ry, rx = radius
        near = (df <= rf + 0.5) & (dy / th <= ry + 0.5) & (dx / tw <= rx + 0.5) & pair_video
        keep = (near | forced_blocks(layout, q.device))[None, None]
    else:
        df = df * frame_weight
        score = -(torch.maximum(torch.maximum(df, dy), dx) + 1e-3 * (df * df + dy * dy + dx * dx).sqrt())
        score = torch.where(pair_video, score, float("-inf"))[None, None]
        keep = keep_by_budget(score, layout, density=density, budget="row")
    return BlockPlan.from_block_mask(layout, keep, "window", trusted=True, to_csr=dense_to_csr)
