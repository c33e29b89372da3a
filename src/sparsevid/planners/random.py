"""``random``: a seeded random plan at the requested density — the baseline every planner must beat."""

from __future__ import annotations

import numbers

import torch

from ..kernels.csr import dense_to_csr
from ..plan import BlockPlan
from . import register_planner
from ._select import _DEFAULT_DENSITY, keep_by_budget


@register_planner("random", default=("density", _DEFAULT_DENSITY))
def random(q, k, layout, *, density=None, mass=None, seed: int = 0, budget: str = "row") -> BlockPlan:
    """Uniformly random key blocks per (batch, head, query block), besides the forced ones.

    Options:
        seed (int): in ``[0, 2**63)``; the plan is a function of ``seed`` and the shapes only (same on
            every device).
        budget (str): ``"row"`` (default) or ``"head"``, see :func:`keep_by_budget`.
    """
    if mass is not None:
        raise ValueError("Expect density for method 'random' (it has no probability estimate) but got mass")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"Expect seed to be an int but got {seed!r}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"Expect seed to be an int in [0, 2**63) but got {seed}")
    B, H = q.shape[:2]
    nb = layout.num_blocks
    generator = torch.Generator().manual_seed(int(seed))
    score = torch.rand(B, H, nb, nb, generator=generator).to(q.device)
    keep = keep_by_budget(score, layout, density=density, budget=budget)
    return BlockPlan.from_block_mask(layout, keep, "random", trusted=True, to_csr=dense_to_csr)
