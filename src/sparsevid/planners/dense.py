"""``dense``: every block — full attention through the sparse path, for tests and warm-up."""

from __future__ import annotations

import torch

from ..kernels.csr import dense_to_csr
from ..plan import BlockPlan
from . import register_planner


@register_planner("dense", budgets=(), default=("density", 1.0))
def dense(q, k, layout, *, density=None, mass=None) -> BlockPlan:
    """All blocks of every head; one broadcast ``(1, 1)`` plan. Accepts only ``density=1``/``mass=1``."""
    if (density is not None and density != 1) or (mass is not None and mass != 1):
        raise ValueError(f"Expect density=1 (or none) for method 'dense' but got density={density}, mass={mass}")
    nb = layout.num_blocks
    keep = torch.ones(1, 1, nb, nb, dtype=torch.bool, device=q.device)
    return BlockPlan.from_block_mask(layout, keep, "dense", keeps_everything=True, trusted=True, to_csr=dense_to_csr)
