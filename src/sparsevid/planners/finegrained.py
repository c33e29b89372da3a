"""``finegrained`` — FG-Attn (arXiv 2509.16518): per query block of M rows, the key *tokens* to keep.

Block-sparse plans skip a (query block, key block) pair only when all of its ``M x N`` scores are
negligible; in video attention the keys that matter for a tile are often scattered (a moving
edge, a repeated texture), so whole key blocks are bought for a few tokens each. This planner
keeps sparsity at ``M x 1`` granularity and returns a :class:`~sparsevid.token_plan.TokenPlan`.

Estimate: for each query block ``m``, ``P[m, j]``, the share of the block's attention that falls
on key token ``j``, from ``queries`` of its real query rows (evenly spaced in the tile):
``P[m] = mean_i softmax(q_i . k / sqrt(d))`` over all ``L`` keys — the quantity whose top entries
the exact M x 1 selection would keep. ``queries=0`` is the cheapest variant: the block's *pooled*
query (mean of its rows, :func:`~sparsevid.kernels.pooling.pool_blocks`), ``P[m] = softmax(qd[m] .
k / sqrt(d))``; its logit is exactly the mean logit of the block's rows, but the mean of the rows'
softmaxes is dominated by each row's own peaks, which the pooled query blurs (on real-clip inputs
it loses to the block planners at equal density; 16 sampled rows beat them, see
``python -m sparsevid bench frontier``). Computed per head, in chunks of query blocks: memory
``O(chunk x queries x L)`` and one ``(NB, L)`` map per head, never ``L x L``; cost ``queries / M``
of the attention's score matmul.

Selection: own-block tokens and text tokens are forced; text query blocks keep everything. The
rest are taken in decreasing ``P[m, j]`` until the budget is spent: ``density`` — each query
block keeps ``round(density * L)`` tokens (``budget="row"``, exact per query block and the same
work for every kernel program), or one threshold on ``P`` per head over all query blocks
(``budget="head"``: peaked blocks give tokens to diffuse ones; ``P[m, j]`` is the head's mass per
computed entry); ``mass`` — each query block keeps tokens until the estimated ``P`` reaches ``mass``.
"""

from __future__ import annotations

import math

import torch

from ..layout import VideoLayout
from ..token_plan import TokenPlan, _text_tokens
from . import register_planner
from ._select import _DEFAULT_DENSITY
from ..kernels.pooling import pool_blocks

# Score elements (float32) per chunk of query blocks: ~64 MiB.
_CHUNK_ELEMENTS = 1 << 24


@register_planner("finegrained", budgets=("density", "mass"), default=("density", _DEFAULT_DENSITY))
def finegrained(q, k, layout, *, density=None, mass=None, budget: str = "row", queries: int = 16) -> TokenPlan:
    """FG-Attn plan: per query block, the key tokens with the most estimated attention mass.

    Options:
        budget (str): ``"row"`` (default): every query block keeps the same number of key tokens,
            ``round(density * L)`` (or more where its forced tokens exceed it), so every program
            of the gather kernel does the same work; ``"head"``: one threshold per head, chosen so
            the head's density is met, so query blocks with peaked attention give tokens to diffuse
            ones. With ``mass``, always per query block.
        queries (int): query rows sampled per block for the estimate (default 16, at most
            ``block_size``); ``0``: the block's pooled query (cheapest, coarser).
    """
    if budget not in ("row", "head"):
        raise ValueError(f"Expect budget in ('row', 'head') but got {budget!r}")
    if isinstance(queries, bool) or not isinstance(queries, int) or not 0 <= queries <= layout.block_size:
        raise ValueError(f"Expect queries to be an int in [0, block_size={layout.block_size}] but got {queries!r}")
    if density is None and mass is None:
        density = _DEFAULT_DENSITY
    B, H, L, D = q.shape
    nb, device = layout.num_blocks, q.device

    tables = layout.on(device)
    block_of_token = tables.block_of_token  # (L,)
    text_tok = _text_tokens(layout, device)  # (L,)
    text_blk = tables.is_text_block  # (NB,)
    forced = (block_of_token[None, :] == torch.arange(nb, device=device)[:, None]) | text_tok | text_blk[:, None]
    n_forced = forced.sum(-1)  # (NB,)
    # The row budget's width is known on the host (no sync): forced counts come from the layout alone.
    # Text query blocks keep every token and store no list (TokenPlan), so only the other rows count.
    video_rows = layout.block_tokens[~layout.is_text_block]
    text_keys = int(layout.block_tokens[layout.is_text_block].sum())  # every token of a text block is forced
    n_forced_max = text_keys + int(video_rows.max()) if video_rows.numel() else 1
    rows = tables.block_tokens.double()

    counts = torch.empty(B, H, nb, dtype=torch.int32, device=device)
    per_head = []
    for h in range(H):
        # NaN in q or k (validate=False) ranks last: topk puts NaN first, before the forced tokens
        log_p = _estimate(q[:, h], k[:, h], layout, queries).nan_to_num(nan=float("-inf"))  # (B, NB, L)
        rank = torch.where(forced, float("inf"), log_p)  # forced tokens first
        if density is not None and budget == "row":
            want = min(L, max(1, round(density * L)))
            n_keep = n_forced.clamp(min=want).expand(B, -1)
        elif density is not None:
            n_keep = n_forced + _head_counts(log_p, forced, rows, density * float(L) ** 2)  # (B, NB)
        elif mass >= 1.0:  # every token: the estimate's float sum reaches 1 before its last (underflowed) tokens
            n_keep = torch.full((B, nb), L, device=device)
        else:
            order = rank.argsort(dim=-1, descending=True)
            p = log_p.exp().gather(-1, order)
            before = p.cumsum(-1) - p
            n_keep = torch.maximum(n_forced, (before < mass).sum(-1))  # (B, NB)
        counts[:, h] = n_keep.to(torch.int32)
        if density is not None and budget == "row":
            width = min(L, max(want, n_forced_max))
        else:
            width = max(1, int(torch.where(n_keep < L, n_keep, 0).max()))  # rows of all L store no list
        top = rank.topk(width, dim=-1).indices  # (B, NB, width)
        valid = torch.arange(width, device=device) < n_keep[..., None]
        # kept tokens ascending, then the (unspecified) tail
        top = torch.where(valid, top, L + top).sort(dim=-1).values
        per_head.append(torch.where(top < L, top, top - L).to(torch.int32))

    kv_tokens = torch.zeros(B, H, nb, max(t.shape[-1] for t in per_head), dtype=torch.int32, device=device)
    for h, top in enumerate(per_head):
        kv_tokens[:, h, :, : top.shape[-1]] = top
    return TokenPlan(layout, counts, kv_tokens, "finegrained", trusted=True)


def _estimate(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, queries: int) -> torch.Tensor:
    """``log P``: float32 ``(B, NB, L)`` for one head (q, k ``(B, L, D)``); each row a distribution over keys."""
    B, L, D = q.shape
    nb, bs = layout.num_blocks, layout.block_size
    scale = 1.0 / math.sqrt(D)
    kf = k.float()
    if queries == 0:
        qs = pool_blocks(q.unsqueeze(1), layout)[:, 0, :, None]  # (B, NB, 1, D)
    else:
        # `queries` evenly spaced real rows of each block (real rows come first in a block)
        tables = layout.on(q.device)
        real = tables.block_tokens
        pos = (2 * torch.arange(queries, device=q.device)[None, :] + 1) * real[:, None] // (2 * queries)
        tok = tables.perm.view(nb, bs).gather(1, pos)  # (NB, S)
        qs = q[:, tok.reshape(-1)].float().view(B, nb, queries, D)
    S = qs.shape[2]
    log_p = torch.empty(B, nb, L, dtype=torch.float32, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * S * L))
    for m0 in range(0, nb, chunk):
        m1 = min(nb, m0 + chunk)
        s = torch.matmul(qs[:, m0:m1], kf.transpose(-1, -2)[:, None]) * scale  # (B, c, S, L)
        log_p[:, m0:m1] = torch.logsumexp(torch.log_softmax(s, dim=-1), dim=2) - math.log(S)
    return log_p


def _head_counts(log_p: torch.Tensor, forced: torch.Tensor, rows: torch.Tensor, target: float) -> torch.Tensor:
    """int64 ``(B, NB)``: non-forced tokens each query block keeps under one per-head threshold on ``P``.

    A (block ``m``, token ``j``) pair costs ``rows[m]`` score entries; pairs are taken in decreasing
    ``P[m, j]`` (mass per computed entry) while the head's total stays closest to ``target``.
    """
    B, nb, L = log_p.shape
    cost = rows[:, None].expand(nb, L)
    remaining = target - float((cost * forced).sum())
    score = torch.where(forced, float("-inf"), log_p).reshape(B, -1)
    vals, order = score.sort(dim=-1, descending=True)
    c = cost.reshape(-1)[order]  # (B, NB * L)
    before = c.cumsum(-1) - c
    take = (before + c / 2 <= remaining) & (vals > float("-inf"))
    kept = torch.zeros_like(take).scatter_(-1, order, take).view(B, nb, L)
    return kept.sum(-1)
