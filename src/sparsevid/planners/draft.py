"""``draft`` — DraftAttention (arXiv 2505.14708): a low-resolution attention map picks the blocks.

Q and K are average-pooled over each block's tile (one spatial tile of one frame, e.g. 8x16
tokens); the pooled ("draft") map ``softmax(Qd Kdᵀ / sqrt(d) + log n_k)`` per head estimates how
much of a query token's attention falls in each key block (``log n_k`` weights a ragged edge
tile by its real token count). The plan keeps the key blocks with the highest estimated mass per
computed score entry, ``P[m, n] / n_k``, until the density (or mass) budget is spent — per head
over the whole map by default, as in the paper, or per query block.
"""

from __future__ import annotations

import math

import torch

from ..kernels.csr import dense_to_csr
from ..kernels.pooling import pool_blocks
from ..layout import VideoLayout
from ..plan import BlockPlan
from . import register_planner
from ._select import _DEFAULT_DENSITY, keep_by_budget


def draft_scores(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """``log P[m, n] - log n_k``: float32 ``(B, H, NB, NB)``, each block's estimated mass per computed entry.

    ``P = softmax(Qd Kdᵀ / sqrt(d) + log n_k)``; its log minus ``log n_k`` is the raw logit minus the
    row's log-sum-exp, so the map is written once and read once (no separate softmax, no exp).
    """
    qd, kd = pool_blocks(q, layout), pool_blocks(k, layout)
    raw = torch.matmul(qd * (1.0 / math.sqrt(q.shape[-1])), kd.transpose(-1, -2))
    log_tokens = layout.on(q.device).block_tokens.float().log()
    return raw - torch.logsumexp(raw + log_tokens, dim=-1, keepdim=True)


def draft_map(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft attention map: ``(log P, P)``, each float32 ``(B, H, NB, NB)``, rows sum to 1."""
    log_p = draft_scores(q, k, layout) + layout.on(q.device).block_tokens.float().log()
    return log_p, log_p.exp()


@register_planner("draft", budgets=("density", "mass"), default=("density", _DEFAULT_DENSITY))
def draft(q, k, layout, *, density=None, mass=None, budget: str = "head") -> BlockPlan:
    """DraftAttention plan.

    Options:
        budget (str): ``"head"`` (default, the paper's global top-k over each head's map),
            ``"row"`` (each query tile keeps its own share) or ``"layer"`` (one top-k over all heads'
            maps: peaked heads give blocks to diffuse ones; the density holds per layer).
    """
    score = draft_scores(q, k, layout)
    probs = None if mass is None else (score + layout.on(q.device).block_tokens.float().log()).exp()
    keep = keep_by_budget(score, layout, density=density, mass=mass, probs=probs, budget=budget)
    return BlockPlan.from_block_mask(layout, keep, "draft", trusted=True, to_csr=dense_to_csr)
