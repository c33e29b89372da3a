"""Shared selection steps of the planners: forced blocks and budget-driven top-k."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..layout import VideoLayout

_DEFAULT_DENSITY = 0.1


def forced_blocks(layout: VideoLayout, device) -> torch.Tensor:
    """bool ``(NB, NB)``: blocks every plan keeps — the diagonal and text in both directions."""
    return _forced_blocks(layout, str(torch.device(device)))


@lru_cache(maxsize=64)
def _forced_blocks(layout: VideoLayout, device: str) -> torch.Tensor:
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        nb = layout.num_blocks
        text = layout.on(device).is_text_block
        eye = torch.eye(nb, dtype=torch.bool, device=device)
        return eye | text[None, :] | text[:, None]


def keep_by_budget(
    score: torch.Tensor,
    layout: VideoLayout,
    *,
    density: float | None = None,
    mass: float | None = None,
    probs: torch.Tensor | None = None,
    budget: str = "row",
) -> torch.Tensor:
    """Forced blocks plus the highest-scoring others, until a density or mass budget is spent.

    Args:
        score (Tensor): float ``(B, H, NB, NB)``, higher is kept first; ``-inf`` is never kept
            unless forced.
        density (float): keep until the real score entries computed reach ``density`` of the
            budget group (the whole head, or one query block's row): each block costs
            ``tokens[m] * tokens[n]`` entries; a block is taken when that brings the total closer
            to the target, so every row (or head) lands within half a block of it.
        mass (float): keep until the captured probability ``probs`` (``(B, H, NB, NB)``, each row a
            distribution over key blocks for one query token of block ``m``) reaches ``mass``.
        budget (str): ``"row"`` — every query block gets its own budget; ``"head"`` — one budget per
            head over the whole map, so rows with peaked attention give blocks to diffuse ones;
            ``"layer"`` — one budget over all heads of a batch element (scores must be comparable
            across heads, e.g. probability per entry), so peaked heads give blocks to diffuse ones
            and the density holds for the layer as a whole, not for each head.

    Returns:
        bool ``(B, H, NB, NB)``.
    """
    if budget not in ("row", "head", "layer"):
        raise ValueError(f"Expect budget in ('row', 'head', 'layer') but got {budget!r}")
    if density is None and mass is None:
        density = _DEFAULT_DENSITY
    if density is not None and budget != "row":
        return _keep_top(score, layout, density, budget)
    B, H, nb, _ = score.shape
    device = score.device
    forced = forced_blocks(layout, device).expand(B, H, nb, nb)
    # float32 sums stay exact to far below half a block (block_size**2 / 2 entries) at video sizes
    tokens = layout.on(device).block_tokens.float()
    L = float(layout.num_tokens)

    if density is not None:
        gain = (tokens[:, None] * tokens[None, :]).expand(B, H, nb, nb)
        target = density * tokens[:, None] * L
    else:
        if probs is None:
            raise ValueError("Expect a probability estimate for mass-based selection; use density with this planner")
        gain = probs.float() * (1.0 if budget == "row" else tokens[:, None] / L)
        target = mass * (H if budget == "layer" else 1)

    if budget != "row":
        flat = (B, H, 1, nb * nb) if budget == "head" else (B, 1, 1, H * nb * nb)
        score, gain, forced_flat = score.reshape(flat), gain.reshape(flat), forced.reshape(flat)
    else:
        forced_flat = forced
    remaining = target - (gain * forced_flat).sum(-1, keepdim=True)

    candidate = ~forced_flat & (score > float("-inf"))
    order = torch.where(candidate, score, float("-inf")).argsort(dim=-1, descending=True)
    g = gain.gather(-1, order)
    ok = candidate.gather(-1, order)
    before = torch.cumsum(g * ok, dim=-1) - g * ok
    if density is not None:
        take = ok & (before + g / 2 <= remaining)
    else:
        take = ok & (before < remaining)
    keep = torch.zeros_like(candidate).scatter_(-1, order, take) | forced_flat
    return keep.reshape(B, H, nb, nb)


def _keep_top(score: torch.Tensor, layout: VideoLayout, density: float, budget: str) -> torch.Tensor:
    """A density budget over whole heads (``"head"``) or the whole layer (``"layer"``), the planners'
    hot path: the same greedy as :func:`keep_by_budget` (candidates by decreasing score, each taken
    while the entries before it plus half its own stay within the budget), computed on the top-k
    candidates only (:func:`_greedy_reach`), with gains and the forced entries from the layout."""
    B, H, nb, _ = score.shape
    device = score.device
    groups = H if budget == "head" else 1
    forced = forced_blocks(layout, device)
    heads_per_group = H // groups
    remaining = heads_per_group * (density * float(layout.num_tokens) ** 2 - _forced_entries(layout))
    flat = score.masked_fill(forced, float("-inf")).reshape(B, groups, -1)
    reach = min(flat.shape[-1], _greedy_reach(layout, density, heads_per_group))
    value, index = flat.topk(reach, dim=-1)  # sorted, best first
    tokens = layout.on(device).block_tokens.float()
    cell = index % (nb * nb)
    gain = tokens[cell // nb] * tokens[cell % nb]
    ok = value > float("-inf")
    g = gain * ok
    before = torch.cumsum(g, dim=-1) - g
    take = ok & (before + gain / 2 <= remaining)
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=device).scatter_(-1, index, take)
    return keep.view(B, H, nb, nb) | forced


def _greedy_reach(layout: VideoLayout, density: float, heads: int) -> int:
    """How many of the best-scored candidates a density budget over ``heads`` whole heads can take.

    Every block but a short last one holds ``block_size`` tokens, so a candidate costs ``block_size**2``
    entries except the ``2 * NB - 1`` pairs of the last block's row and column, per head. The greedy
    stops once ``block_size**2`` more entries than the budget were passed, so a top-k of this size
    (known on the host: no sync) holds everything it takes, instead of a sort of all ``NB**2`` entries.
    """
    remaining = heads * (density * float(layout.num_tokens) ** 2 - _forced_entries(layout))
    full = float(layout.block_size) ** 2
    return max(1, math.ceil(max(remaining, 0.0) / full) + heads * (2 * layout.num_blocks - 1) + 1)


@lru_cache(maxsize=64)
def _forced_entries(layout: VideoLayout) -> float:
    """Score entries of one head's forced blocks (host arithmetic, once per layout)."""
    tokens = layout.block_tokens.double()
    return float((forced_blocks(layout, "cpu").double() * tokens[:, None] * tokens[None, :]).sum())
