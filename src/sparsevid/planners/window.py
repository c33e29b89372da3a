"""``window``: a static spatio-temporal neighbourhood of tiles (sliding-tile style), content-blind."""

from __future__ import annotations

import torch

from ..plan import BlockPlan
from . import register_planner
from ._select import forced_blocks, keep_by_budget


@register_planner("window")
def window(
    q, k, layout, *, density=None, mass=None, radius: tuple[int, int, int] | None = None, frame_weight: float = 4.0
) -> BlockPlan:
    """Key tiles near each query tile in time and space; one broadcast ``(1, 1)`` plan for all heads.

    Options:
        radius (tuple): ``(frames, tile rows, tile columns)``: keep key tiles within this distance on
            every axis. Exclusive with ``density``.
        frame_weight (float): with ``density``, tiles are ranked by Chebyshev distance between tile
            centres in token units, one frame counting as ``frame_weight`` tokens of displacement
            (Euclidean distance breaks ties), and each query tile keeps the nearest ones.
    """
    if mass is not None:
        raise ValueError("Expect density or radius for method 'window' (it is static) but got mass")
    coords = layout.on(q.device).block_coords
    video = coords[:, 0] >= 0
    pair_video = video[:, None] & video[None, :]
    if radius is not None:
        if density is not None:
            raise ValueError("Expect one of radius or density for method 'window' but got both")
        if not (isinstance(radius, (tuple, list)) and len(radius) == 3 and all(isinstance(r, int) and r >= 0 for r in radius)):
            raise ValueError(f"Expect radius=(frames, tile_rows, tile_cols) of ints >= 0 but got {radius!r}")
        dist = (coords[:, None, :] - coords[None, :, :]).abs()
        near = (dist <= torch.tensor(radius, device=q.device)).all(-1) & pair_video
        keep = (near | forced_blocks(layout, q.device))[None, None]
    else:
        th, tw = layout.tile
        centre = coords.double() * torch.tensor([frame_weight, th, tw], device=q.device, dtype=torch.float64)
        delta = (centre[:, None, :] - centre[None, :, :]).abs()
        score = -(delta.amax(-1) + 1e-3 * delta.norm(dim=-1))
        score = torch.where(pair_video, score, float("-inf"))[None, None]
        keep = keep_by_budget(score, layout, density=density, budget="row")
    return BlockPlan.from_block_mask(layout, keep, "window")
