"""``xattn`` — XAttention: antidiagonal scoring of blocks, kept by cumulative mass.

Inside each ``stride x stride`` sub-square of the score matrix, the sum over its antidiagonal is a
cheap estimate of the sub-square's total that sees every query and every key once. Concatenating
each group of ``stride`` query rows in reverse order, and each group of key rows in order, turns
those antidiagonal sums into one small matrix product ``(S/stride) x (S/stride)``; its row
softmax, summed over each block's groups, estimates the attention mass of every (query block, key
block) pair. Each query block then keeps its key blocks in decreasing order of estimated mass
(per computed entry) until ``mass`` (XAttention's threshold, default 0.9) or ``density`` is met.
Computed on the tile order, in chunks of query groups: memory O((S/stride) x chunk), never L x L.
"""

from __future__ import annotations

import math

import torch

from ..kernels.csr import dense_to_csr
from ..plan import BlockPlan
from . import register_planner
from ._select import keep_by_budget

_CHUNK_ELEMENTS = 1 << 24
_DEFAULT_MASS = 0.9


@register_planner("xattn", budgets=("density", "mass"), default=("mass", _DEFAULT_MASS))
def xattn(q, k, layout, *, density=None, mass=None, stride: int = 8, budget: str = "row") -> BlockPlan:
    """XAttention plan.

    Options:
        stride (int): antidiagonal stride; divides ``block_size`` (default 8).
        budget (str): ``"row"`` (default, as XAttention), ``"head"`` or ``"layer"`` (see ``keep_by_budget``).
    """
    bs = layout.block_size
    if not isinstance(stride, int) or stride < 1 or bs % stride:
        raise ValueError(f"Expect stride to be a positive int dividing block_size={bs} but got {stride!r}")
    if density is None and mass is None:
        mass = _DEFAULT_MASS
    B, H, L, D = q.shape
    nb, groups = layout.num_blocks, bs // stride
    ng = nb * groups
    real_slot = (layout.on(q.device).perm >= 0).view(ng, stride)
    key_group_real = real_slot.any(-1)  # all-padding key groups get no mass
    query_group_real = real_slot.any(-1).view(nb, groups).float()

    # (B, H, NG, stride * D): query rows of a group reversed, key rows in order -> antidiagonals.
    qs = layout.to_tiles(q).float().view(B, H, ng, stride, D).flip(3).reshape(B, H, ng, stride * D)
    ks = layout.to_tiles(k).float().view(B, H, ng, stride * D)
    scale = 1.0 / (math.sqrt(D) * stride)

    block_mass = torch.empty(B, H, nb, nb, dtype=torch.float32, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * ng * groups))
    for m0 in range(0, nb, chunk):
        m1 = min(nb, m0 + chunk)
        s = torch.matmul(qs[:, :, m0 * groups : m1 * groups], ks.transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~key_group_real, float("-inf")), dim=-1)
        p = p.view(B, H, m1 - m0, groups, nb, groups).sum(-1)  # mass per key block, per query group
        weight = query_group_real[m0:m1]
        block_mass[:, :, m0:m1] = (p * weight[..., None]).sum(3) / weight.sum(-1)[:, None]

    score = block_mass.log() - layout.on(q.device).block_tokens.float().log()
    keep = keep_by_budget(score, layout, density=density, mass=mass, probs=block_mass, budget=budget)
    return BlockPlan.from_block_mask(layout, keep, "xattn", trusted=True, to_csr=dense_to_csr)
