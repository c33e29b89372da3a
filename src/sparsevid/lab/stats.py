"""Attention statistics: how concentrated a video transformer's attention is, and where its mass sits.

Why: a sparse plan can only keep mass the attention puts in few places. Before a planner is blamed
(or praised) for a fidelity number, these statistics say what *any* plan could keep — the
oracle — and whether the mass is local in time and space (what ``window`` bets on) or spread out.
``python -m sparsevid eval --stats`` reports them for every video self-attention layer x head.

Definitions, per head. A *row* is one **video** query token's softmax ``p = softmax(q kᵀ * scale)``
over all ``L`` keys, exactly as the model computes it; every statistic is the mean over the video
rows of all batch elements.

- ``entropy``: ``-sum(p log p) / log L`` — 1 is uniform attention, 0 one key.
- ``block@f`` (block oracle): the mass a block plan keeping a fraction ``f`` of the key blocks can
  keep at best. Blocks are ``layout``'s (tile order, ``block_of_token``). For each query block the
  oracle keeps the ``max(1, round(f * NBv))`` non-text key blocks with the most mass summed over the
  block's video rows (one choice per query block, as a plan makes it); ``NBv`` = blocks without a
  text token. Every row of the block is then scored on those blocks.
- ``token@f`` (token oracle): each row keeps its own ``max(1, round(f * V))`` heaviest video keys
  (``V`` video tokens) — what token-level selection could keep; ``token@f >= block@f`` always.
- ``own_frame``: mass on keys in the query's frame; ``near_frames``: mass on keys within ±1 frame.
- ``neighbourhood``: mass on keys in the query's *tile neighbourhood*: the tiles (``layout.tile``,
  the spatial tiles that define the tile order) whose frame, tile row and tile column each differ
  from the query's tile by at most 1 — its own tile, the (up to) 8 around it in the same frame, and
  those 9 in the previous and next frame (27 tiles away from the edges); ``window`` with
  ``radius=(1, 1, 1)`` keeps about this.
- ``text``: mass on text keys (0 without text).

What a given plan keeps, on the same rows: :func:`plan_mass` (the true mass on the keys a
``BlockPlan``/``TokenPlan`` computes; at equal density it is at most ``block@f``/``token@f`` up to
the planners' forced own/text blocks) and :func:`block_mass` (the true map at block resolution, what
``draft``'s pooled map estimates).

Text tokens (``layout.text_tokens``, joint-attention models): every plan attends them densely in both
directions (DESIGN.md), so (1) text *query* rows are left out — they are always computed in full and
have no frame or tile; (2) mass on text *keys* stays in each row's softmax, belongs to no frame or
tile (it counts against the locality statistics), and both oracles always keep it on top of their
budget: the block oracle keeps every text block (a block holding any text token) and chooses among
the others, the token oracle keeps the text keys and chooses among the video keys.

Memory: rows are processed in chunks of whole query blocks (``chunk_rows``), one head at a time, so
no more than ``chunk_rows x L`` probabilities exist at once: L = 16,384 (16 x 32 x 32) with the
default 1,024 rows is 64 MiB per float32 temporary on a GPU; the CPU testbed (L = 4,096) takes seconds.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import torch

from ..layout import VideoLayout

__all__ = ["FRACTIONS", "attention_stats", "plan_mass", "block_coverage", "block_mass", "layer_stats", "summarize_stats", "format_stats_table", "write_stats"]

FRACTIONS = (0.05, 0.1, 0.25)
_LOCALITY = ("own_frame", "near_frames", "neighbourhood", "text")


def stat_names(fractions=FRACTIONS) -> list[str]:
    """The statistic names in report order (``block@f``/``token@f`` for each fraction)."""
    return ["entropy", *(f"block@{f:g}" for f in fractions), *(f"token@{f:g}" for f in fractions), *_LOCALITY]


def _check(q, k, layout, chunk_rows, fractions=FRACTIONS) -> None:
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"Expect layout to be a VideoLayout but got {type(layout).__name__}")
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"Expect {name} to be a (batch, heads, L, head_dim) tensor but got {getattr(x, 'shape', type(x))}")
    if q.shape != k.shape:
        raise ValueError(f"Expect k of the same shape as q {tuple(q.shape)} but got {tuple(k.shape)}")
    if q.shape[2] != layout.num_tokens:
        raise ValueError(f"Expect L == layout.num_tokens = {layout.num_tokens} but got q of L={q.shape[2]}")
    if not fractions or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 for f in fractions):
        raise ValueError(f"Expect fractions to be numbers in (0, 1] but got {fractions!r}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
        raise ValueError(f"Expect chunk_rows to be an int > 0 but got {chunk_rows!r}")


def _token_tables(layout: VideoLayout, device) -> dict[str, torch.Tensor]:
    """Per token: video or not, frame, tile id (-1 for text); per tile: its 27 neighbours (-1: none)."""
    F, H, W, T = layout.frames, layout.height, layout.width, layout.text_tokens
    th, tw = layout.tile
    nty, ntx = layout.tiles_per_frame
    local = torch.arange(layout.num_tokens) - (T if layout.text_first else 0)
    video = (local >= 0) & (local < layout.video_tokens)
    local = local.clamp(0, layout.video_tokens - 1)
    frame, y, x = local // (H * W), local % (H * W) // W, local % W
    tile = (frame * nty + y // th) * ntx + x // tw
    tf, ty, tx = torch.meshgrid(torch.arange(F), torch.arange(nty), torch.arange(ntx), indexing="ij")
    neighbours = []
    for df, dy, dx in itertools.product((-1, 0, 1), repeat=3):
        f, a, b = tf + df, ty + dy, tx + dx
        inside = (f >= 0) & (f < F) & (a >= 0) & (a < nty) & (b >= 0) & (b < ntx)
        neighbours.append(torch.where(inside, (f * nty + a) * ntx + b, -1).flatten())
    frames = torch.arange(F)
    tables = dict(
        video=video, frame=frame.masked_fill(~video, -1), tile=tile.masked_fill(~video, -1),
        neighbours=torch.stack(neighbours, -1), near=(frames[:, None] - frames[None, :]).abs() <= 1,
    )
    return {name: t.to(device) for name, t in tables.items()}


def attention_stats(
    q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, *, scale: float | None = None,
    fractions=FRACTIONS, chunk_rows: int = 1024,
) -> dict[str, torch.Tensor]:
    """The statistics of the module docstring for every head of one attention layer.

    Args:
        q (Tensor): ``(batch, heads, L, head_dim)`` queries, ``L == layout.num_tokens``, any dtype
            (scores are computed in float32).
        k (Tensor): ``(batch, heads, L, head_dim)`` keys.
        layout (VideoLayout): grid, text tokens and the blocks/tiles the oracle and locality use.
        scale (float, optional): score scale; default ``head_dim ** -0.5`` (SDPA's).
        fractions (tuple[float, ...]): budgets of the block and token oracles, in (0, 1].
        chunk_rows (int): query rows per chunk (rounded down to whole blocks, at least one).

    Returns:
        dict[str, Tensor]: ``name -> float64 (heads,)`` on the CPU, names as :func:`stat_names`.

    Raises:
        ValueError: a bad shape, ``fractions`` or ``chunk_rows`` (named); TypeError: ``layout``.
    """
    _check(q, k, layout, chunk_rows, fractions)
    B, H = q.shape[:2]
    device = q.device
    t = _token_tables(layout, device)
    lt = layout.on(device)
    vkeys = t["video"].nonzero().squeeze(1)
    candidates = (~lt.is_text_block).nonzero().squeeze(1)  # key blocks the block oracle chooses from
    kb = [max(1, round(f * candidates.numel())) if candidates.numel() else 0 for f in fractions]
    kt = [max(1, round(f * vkeys.numel())) for f in fractions]
    names = stat_names(fractions)
    sums = torch.zeros(len(names), H, dtype=torch.float64, device=device)  # on the device: no sync per chunk
    for b, h, start, rows, logp in _row_chunks(q, k, layout, scale, chunk_rows, t["video"]):
        sums[:, h] += _chunk_stats(logp, rows, start, t, lt, vkeys, candidates, kb, kt)
    sums = sums.cpu() / (B * vkeys.numel())
    return dict(zip(names, sums.unbind(0)))


def _row_chunks(q, k, layout: VideoLayout, scale, chunk_rows: int, video: torch.Tensor):
    """Yield ``(b, h, start, rows, logp)`` over whole query blocks ``start..`` of tile order: ``rows`` the
    chunk's video query tokens (original indices), ``logp`` float32 ``(len(rows), L)`` their log-softmax
    over all keys. The one loop every statistic here shares (memory: ``chunk_rows x L`` per temporary)."""
    B, H, L, D = q.shape
    scale = D**-0.5 if scale is None else scale
    perm, bs = layout.on(q.device).perm, layout.block_size
    blocks_per_chunk = max(1, chunk_rows // bs)
    for b, h in itertools.product(range(B), range(H)):
        keys = k[b, h].float()
        for start in range(0, layout.num_blocks, blocks_per_chunk):
            rows = perm[start * bs : min((start + blocks_per_chunk) * bs, L)]
            rows = rows[video[rows]]
            if rows.numel():
                yield b, h, start, rows, (q[b, h, rows].float() * scale @ keys.T).log_softmax(-1)


def _chunk_stats(logp, rows, start, t, lt, vkeys, candidates, kb, kt) -> torch.Tensor:
    """Sums over the chunk's rows (query blocks ``start..``) of every statistic, float64 ``(stats,)``."""
    p = logp.exp()  # (n, L): a few such temporaries live at once, never L x L
    entropy = -(p * logp).sum(-1) / math.log(p.shape[-1])
    del logp
    pv = p if vkeys.numel() == p.shape[-1] else p[:, vkeys]
    text = (p.sum(-1) - pv.sum(-1)) if pv is not p else torch.zeros_like(entropy)
    # block oracle: per-row mass of each key block, summed over the rows of each query block
    per_row = torch.zeros(p.shape[0], lt.is_text_block.numel(), device=p.device).index_add_(1, lt.block_of_token, p)
    qblock = lt.block_of_token[rows] - start
    per_block = torch.zeros(int(qblock.max()) + 1, per_row.shape[1], device=p.device).index_add_(0, qblock, per_row)
    forced = (per_row * lt.is_text_block).sum(-1)
    best = candidates[per_block[:, candidates].topk(max(kb), dim=-1).indices]  # (query blocks, max k), best first
    block = _prefix(per_row.gather(1, best[qblock]))  # block[:, j]: mass of the best j blocks
    # token oracle: each row's heaviest video keys
    token = _prefix(pv.topk(max(kt), dim=-1).values)
    # locality: mass per key frame and per key tile
    frames = torch.zeros(p.shape[0], t["near"].shape[0], device=p.device).index_add_(1, t["frame"][vkeys], pv)
    own = frames.gather(1, t["frame"][rows, None]).squeeze(1)
    near = (frames * t["near"][t["frame"][rows]]).sum(-1)
    tiles = torch.zeros(p.shape[0], t["neighbours"].shape[0], device=p.device).index_add_(1, t["tile"][vkeys], pv)
    nbrs = t["neighbours"][t["tile"][rows]]
    neighbourhood = (tiles.gather(1, nbrs.clamp(min=0)) * (nbrs >= 0)).sum(-1)
    columns = [entropy, *(forced + block[:, i] for i in kb), *(text + token[:, i] for i in kt), own, near, neighbourhood, text]
    return torch.stack(columns).double().sum(-1)


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sums along the last dim with a leading 0: ``out[..., j]`` = sum of the first ``j``."""
    return torch.nn.functional.pad(x.cumsum(-1), (1, 0))


# ------------------------------------------------------------------------------ a given plan's view
def plan_mass(q: torch.Tensor, k: torch.Tensor, plan, *, scale: float | None = None, chunk_rows: int = 1024) -> torch.Tensor:
    """The true attention mass a plan computes: per head, the mean over the video rows (and batch) of
    ``sum(p)`` over the keys the plan computes exactly for the row (its query block's, or with a
    ``ClusterPlan`` its query cluster's) — what ``block@f``/``token@f`` bound from above for a plan of
    that density (text keys, always kept, count; a ``ClusterPlan``'s centroid terms do not).

    Args:
        q, k (Tensor): ``(batch, heads, L, head_dim)``, ``L == plan.layout.num_tokens``.
        plan (BlockPlan | TokenPlan | ClusterPlan): broadcasts over batch/heads like :func:`sparsevid.sparse_attention`.
        scale (float, optional): score scale; default ``head_dim ** -0.5``.

    Returns:
        Tensor: float64 ``(heads,)`` on the CPU.
    """
    from ..cluster_plan import ClusterPlan
    from ..plan import BlockPlan

    layout = plan.layout
    _check(q, k, layout, chunk_rows)
    B, H = q.shape[:2]
    t, lt = _token_tables(layout, q.device), layout.on(q.device)
    plan = plan.to(q.device)
    by_cluster, by_block = isinstance(plan, ClusterPlan), isinstance(plan, BlockPlan)
    if by_cluster:  # a row keeps its query cluster's kept key clusters and every text key (label -1)
        q_labels, k_labels, kept = plan.q_labels(), plan.k_labels(), plan.kept_clusters()
    else:
        keep = plan.to_dense()  # (B', H', NB, NB) blocks or (B', H', NB, L) tokens
    sums = torch.zeros(H, dtype=torch.float64, device=q.device)
    for b, h, _, rows, logp in _row_chunks(q, k, layout, scale, chunk_rows, t["video"]):
        p = logp.exp()
        pb, ph = min(b, plan.shape[0] - 1), min(h, plan.shape[1] - 1)
        if by_cluster:
            labels = k_labels[pb, ph]
            mask = kept[pb, ph][q_labels[pb, ph, rows]][:, labels.clamp(min=0)] | (labels < 0)
        else:
            if by_block:  # mass per key block first: (n, NB), not (n, L) masks
                p = torch.zeros(p.shape[0], layout.num_blocks, device=p.device).index_add_(1, lt.block_of_token, p)
            mask = keep[pb, ph, lt.block_of_token[rows]]
        sums[h] += (p * mask).sum().double()
    return sums.cpu() / (B * int(t["video"].sum()))


def block_coverage(plan) -> torch.Tensor:
    """What a plan computes at block resolution: ``[b, h, m, n]`` = the share of the score entries between
    query block ``m``'s and key block ``n``'s real tokens that the plan computes exactly (0 or 1 for a
    ``BlockPlan``, the share of the key block's tokens for a ``TokenPlan``, of the token pairs for a
    ``ClusterPlan``); what a mask picture draws, never an ``L x L`` mask.

    Returns:
        Tensor: float32 ``(B', H', NB, NB)`` on the plan's device.
    """
    from ..cluster_plan import ClusterPlan

    if not isinstance(plan, ClusterPlan):
        return plan._block_coverage().float()
    tables, nb = plan.layout.on(plan.device), plan.layout.num_blocks

    def per_block(labels: torch.Tensor, clusters: int) -> torch.Tensor:
        """float ``(B', H', NB, 1 + clusters)``: tokens of each block in each cluster; column 0 the text tokens."""
        slots = tables.block_of_token * (clusters + 1) + labels + 1  # label -1 (text) lands in column 0
        counts = torch.zeros(*labels.shape[:2], nb * (clusters + 1), device=plan.device)
        return counts.scatter_add_(-1, slots, torch.ones_like(counts[..., :1]).expand_as(slots)).unflatten(-1, (nb, -1))

    kept = torch.nn.functional.pad(plan.kept_clusters().float(), (1, 0, 1, 0), value=1.0)  # text rows/keys: all
    pairs = per_block(plan.q_labels(), plan.num_q_clusters) @ kept @ per_block(plan.k_labels(), plan.num_k_clusters).mT
    tokens = tables.block_tokens.float()
    return pairs / (tokens[:, None] * tokens[None, :])


def block_mass(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, *, scale: float | None = None,
               chunk_rows: int = 1024) -> torch.Tensor:
    """The true attention map at block resolution: ``[b, h, m, n]`` = mean over query block ``m``'s video
    rows of the mass on key block ``n`` (rows sum to 1; text query blocks are 0). What a planner's
    estimate (``draft``'s pooled map) is an estimate of.

    Returns:
        Tensor: float32 ``(batch, heads, NB, NB)`` on the CPU.
    """
    _check(q, k, layout, chunk_rows)
    B, H = q.shape[:2]
    t, lt = _token_tables(layout, q.device), layout.on(q.device)
    nb = layout.num_blocks
    out = torch.zeros(B, H, nb, nb, device=q.device)
    for b, h, _, rows, logp in _row_chunks(q, k, layout, scale, chunk_rows, t["video"]):
        per_row = torch.zeros(rows.numel(), nb, device=q.device).index_add_(1, lt.block_of_token, logp.exp())
        out[b, h].index_add_(0, lt.block_of_token[rows], per_row)
    rows = torch.zeros(nb, device=q.device).index_add_(0, lt.block_of_token, t["video"].float())
    return (out / rows.clamp_min(1)[:, None]).cpu()


# ------------------------------------------------------------------------------ a model's layers
def layer_stats(layers, grid, text_first: bool = False, *, tiling: dict | None = None, fractions=FRACTIONS,
                chunk_rows: int = 1024) -> list[dict]:
    """Rows ``{layer, head, <stat>: float}`` for captured layers.

    Args:
        layers: ``[(q, k, v, scale), ...]`` as :class:`sparsevid.lab.eval.LayerCapture` records them
            (``scale`` None: SDPA's default).
        grid (tuple[int, int, int]): ``(frames, height, width)`` in tokens; tokens beyond
            ``F*H*W`` are text (first when ``text_first``).
        tiling (dict, optional): ``tile``/``block_size`` of the :class:`VideoLayout` (the blocks
            the oracle chooses, the tiles of the neighbourhood); default the layout's defaults.
    """
    rows = []
    for index, (q, k, _, scale) in enumerate(layers):
        frames, height, width = grid
        layout = VideoLayout(frames, height, width, text_tokens=q.shape[-2] - frames * height * width,
                             text_first=text_first, **(tiling or {}))
        values = attention_stats(q, k, layout, scale=scale, fractions=fractions, chunk_rows=chunk_rows)
        for head in range(q.shape[1]):
            rows.append(dict(layer=index, head=head, **{name: float(v[head]) for name, v in values.items()}))
    return rows


def summarize_stats(rows: list[dict]) -> list[dict]:
    """Mean per ``(layer, head)`` over the given rows (e.g. several videos), then per layer over its
    heads (``head="mean"``), then over everything (``layer="mean"``, ``head="mean"``)."""
    names = [key for key in rows[0] if key not in ("layer", "head", "case", "label", "seed")]

    def mean(group, **where):
        return dict(**where, **{n: sum(r[n] for r in group) / len(group) for n in names})

    keys = list(dict.fromkeys((r["layer"], r["head"]) for r in rows))
    heads = [mean([r for r in rows if (r["layer"], r["head"]) == key], layer=key[0], head=key[1]) for key in keys]
    layers = [mean([r for r in heads if r["layer"] == layer], layer=layer, head="mean")
              for layer in dict.fromkeys(r["layer"] for r in heads)]
    return heads + layers + [mean(heads, layer="mean", head="mean")]


def format_stats_table(summary: list[dict]) -> str:
    """Fixed-width table: one line per ``layer.head`` (and per-layer / overall means)."""
    names = [key for key in summary[0] if key not in ("layer", "head")]
    head = f"{'layer.head':>10} " + " ".join(f"{n:>{max(7, len(n))}}" for n in names)
    lines = [head, "-" * len(head)]
    for r in summary:
        tag = "mean" if r["layer"] == "mean" else f"{r['layer']}.{r['head']}"
        lines.append(f"{tag:>10} " + " ".join(f"{r[n]:>{max(7, len(n))}.3f}" for n in names))
    return "\n".join(lines)


def save_stats_plot(summary: list[dict], path, title: str = "", fraction: float = 0.1) -> Path:
    """Heat maps layer (down) x head (across) of the key statistics, values written in small grids."""
    from .viz import _pyplot, save_figure

    plt = _pyplot()
    cells = [r for r in summary if r["layer"] != "mean" and r["head"] != "mean"]
    layers = sorted({r["layer"] for r in cells})
    heads = sorted({r["head"] for r in cells})
    shown = ["entropy", f"block@{fraction:g}", f"token@{fraction:g}", "near_frames", "neighbourhood"]
    shown = [n for n in shown if n in cells[0]]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.4 * len(shown) + 0.6, 1.3 + 0.35 * len(layers)), squeeze=False)
    for ax, name in zip(axes[0], shown):
        grid = torch.full((len(layers), len(heads)), float("nan"))
        for r in cells:
            grid[layers.index(r["layer"]), heads.index(r["head"])] = r[name]
        image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        if grid.numel() <= 64:
            for (i, j), v in zip(itertools.product(range(len(layers)), range(len(heads))), grid.flatten().tolist()):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set(title=name, xlabel="head", ylabel="layer", xticks=range(len(heads)), yticks=range(len(layers)))
        ax.title.set_fontsize(9)
    fig.colorbar(image, ax=axes[0, -1])
    return save_figure(fig, path, title)


def write_stats(out_dir, rows: list[dict], settings: dict) -> list[Path]:
    """``stats.json`` (settings, summary, every row), ``stats.csv`` (the summary) and
    ``attention_stats.png`` in ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_stats(rows)
    (out_dir / "stats.json").write_text(json.dumps(dict(settings=settings, summary=summary, rows=rows), indent=1, default=str))
    with open(out_dir / "stats.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    cases = settings.get("cases", 1)
    title = (f"{settings.get('pipeline', '')} attention statistics, step {settings.get('capture_step', '?')}"
             f" (mean of {cases} video{'s' if cases != 1 else ''})")
    plot = save_stats_plot(summary, out_dir / "attention_stats.png", title)
    return [out_dir / "stats.json", out_dir / "stats.csv", plot]
