"""``finegrained`` — FG-Attn (arXiv 2509.16518): per query block of M rows, the key *tokens* to keep.

Block-sparse plans skip a (query block, key block) pair only when all of its ``M x N`` scores are
negligible; in video attention the keys that matter for a tile are often scattered (a moving
edge, a repeated texture), so whole key blocks are bought for a few tokens each. This planner
keeps sparsity at ``M x 1`` granularity and returns a :class:`~sparsevid.token_plan.TokenPlan`.

Estimate: each query block's *pooled* query ``qd[m]`` (the mean of its real query rows,
:func:`~sparsevid.planners.draft.pool_blocks`) is scored against every key token:
``s[m, j] = qd[m] . k[j] / sqrt(d)``. Since the logit is linear in q, ``s[m, j]`` is exactly the
mean over the block's query rows of their logit with key ``j``; ``softmax_j(s[m])`` estimates the
share of the block's attention that falls on token ``j``. Computed per head, in chunks of query
blocks: memory ``O(chunk x L)``, never ``L x L``; cost ``NB x L x d`` per head, ``1/M`` of the
attention's score matmul.

Selection: own-block tokens and text tokens are forced; text query blocks keep everything. The
rest are taken in decreasing ``s[m, j]`` until the budget is spent: ``density`` — each query
block keeps ``round(density * L)`` tokens (``budget="row"``, exact per query block and the same
work for every kernel program), or one threshold per head over all query blocks
(``budget="head"``: peaked blocks give tokens to diffuse ones); ``mass`` — each query block keeps
tokens until the estimated probability reaches ``mass``.
"""

from __future__ import annotations

import math

import torch

from ..layout import VideoLayout
from ..token_plan import TokenPlan, _text_tokens
from . import register_planner
from ._select import _DEFAULT_DENSITY, check_finite
from .draft import pool_blocks

# Score elements (float32) per chunk of query blocks: ~64 MiB.
_CHUNK_ELEMENTS = 1 << 24


@register_planner("finegrained")
def finegrained(q, k, layout, *, density=None, mass=None, budget: str = "row") -> TokenPlan:
    """FG-Attn plan: per query block, the key tokens with the highest pooled-query logit.

    Options:
        budget (str): ``"row"`` (default): every query block keeps the same number of key tokens,
            ``round(density * L)`` (or more where its forced tokens exceed it), so every program
            of the gather kernel does the same work; ``"head"``: one logit threshold per head,
            chosen so the head's density is met, so query blocks with peaked attention give tokens
            to diffuse ones. With ``mass``, always per query block.
    """
    if budget not in ("row", "head"):
        raise ValueError(f"Expect budget in ('row', 'head') but got {budget!r}")
    if density is None and mass is None:
        density = _DEFAULT_DENSITY
    B, H, L, D = q.shape
    nb, device = layout.num_blocks, q.device
    qd = pool_blocks(q, layout)  # (B, H, NB, D) float32
    check_finite("the pooled queries", qd)
    scale = 1.0 / math.sqrt(D)

    block_of_token = layout.inverse_perm.to(device) // layout.block_size  # (L,)
    text_tok = _text_tokens(layout, device)  # (L,)
    text_blk = layout.is_text_block.to(device)  # (NB,)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * L))

    if density is not None and budget == "head":
        threshold = _head_thresholds(qd, k, layout, density, scale, chunk)  # (B, H)
    want = None if density is None else min(L, max(1, round(density * L)))

    counts = torch.empty(B, H, nb, dtype=torch.int32, device=device)
    pieces = []  # (m0, m1, h, int32 (B, c, width)) ascending token lists
    for h in range(H):
        kh = k[:, h].float()  # (B, L, D): one head in float32 at a time
        for m0 in range(0, nb, chunk):
            m1 = min(nb, m0 + chunk)
            s = torch.matmul(qd[:, h, m0:m1], kh.transpose(-1, -2)) * scale  # (B, c, L)
            check_finite("the pooled-query logits", s)
            forced = (block_of_token[None, :] == torch.arange(m0, m1, device=device)[:, None]) | text_tok  # (c, L)
            forced = forced | text_blk[m0:m1, None]
            n_forced = forced.sum(-1)  # (c,)
            # forced tokens rank first, then by logit
            rank = torch.where(forced, float("inf"), s)
            if density is not None and budget == "row":
                n_keep = n_forced.clamp(min=want).expand(B, -1)
            elif density is not None:
                n_keep = n_forced + ((s >= threshold[:, h, None, None]) & ~forced).sum(-1)  # (B, c)
            else:
                p = torch.softmax(s, dim=-1)
                order = rank.argsort(dim=-1, descending=True)
                cum = p.gather(-1, order).cumsum(-1)
                before = cum - p.gather(-1, order)
                n_keep = torch.maximum(n_forced, (before < mass).sum(-1))  # (B, c)
            width = int(n_keep.max())
            top = rank.topk(width, dim=-1).indices  # (B, c, width), forced first then by logit
            valid = torch.arange(width, device=device) < n_keep[..., None]
            # ascending token order for the kept ones, the tail (invalid) sorted after them
            key = torch.where(valid, top, L + top)
            top = key.sort(dim=-1).values
            top = torch.where(top < L, top, top - L)
            counts[:, h, m0:m1] = n_keep.to(torch.int32)
            pieces.append((m0, m1, h, top.to(torch.int32)))

    max_tokens = max(p[3].shape[-1] for p in pieces)
    kv_tokens = torch.zeros(B, H, nb, max_tokens, dtype=torch.int32, device=device)
    for m0, m1, h, top in pieces:
        kv_tokens[:, h, m0:m1, : top.shape[-1]] = top
    return TokenPlan(layout, counts, kv_tokens, "finegrained")


def _head_thresholds(qd, k, layout: VideoLayout, density: float, scale: float, chunk: int) -> torch.Tensor:
    """float32 ``(B, H)``: per head, the logit above which non-forced (block, token) pairs are kept so
    that the head's computed entries reach ``density * L**2`` (each pair costs the block's real rows).

    Forced entries are counted first; the threshold is found by a weighted quantile over all the
    head's ``NB x L`` pooled logits (``NB x L`` floats per head: ``L / block_size`` times less than
    ``L x L``).
    """
    B, H, nb, D = qd.shape
    L = layout.num_tokens
    device = qd.device
    block_of_token = layout.inverse_perm.to(device) // layout.block_size
    text_tok = _text_tokens(layout, device)
    text_blk = layout.is_text_block.to(device)
    forced = (block_of_token[None, :] == torch.arange(nb, device=device)[:, None]) | text_tok | text_blk[:, None]
    rows = layout.block_tokens.to(device, torch.float64)
    cost = rows[:, None].expand(nb, L)
    remaining = density * float(L) ** 2 - float((cost * forced).sum())
    out = torch.full((B, H), float("inf"), device=device)
    for h in range(H):
        kh = k[:, h].float()
        s = torch.matmul(qd[:, h], kh.transpose(-1, -2)) * scale  # (B, NB, L)
        s = torch.where(forced, float("-inf"), s).reshape(B, -1)
        vals, order = s.sort(dim=-1, descending=True)
        c = cost.reshape(-1)[order]  # (B, NB * L)
        before = c.cumsum(-1) - c
        take = (before + c / 2 <= remaining) & (vals > float("-inf"))
        n = take.sum(-1)  # (B,)
        out[:, h] = torch.where(n > 0, vals.gather(-1, (n - 1).clamp(min=0)[:, None]).squeeze(-1), float("inf"))
    return out
