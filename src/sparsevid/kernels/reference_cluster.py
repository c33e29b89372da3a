"""A :class:`~sparsevid.cluster_plan.ClusterPlan` in plain PyTorch: the CPU path and the oracle twin of the
clustered kernels.

The unit of work is a run of at most ``_ROWS`` query rows of one query cluster of one (batch, head) (text rows:
runs of the text queries, which keep every key). A unit gathers its kept keys once — the text keys, then the
tokens of the key clusters its query cluster keeps, cluster by cluster in ``k_order`` — and runs through the
reference's one chunked core (:func:`~sparsevid.kernels.reference._attend`, one unit per "block", batch and heads
flattened into the sequence), so memory stays O(rows x kept) per chunk. With the cluster tail, every non-empty
key cluster the unit's cluster drops joins the same softmax as one term: logit ``scale * q . k̄_j +
log n_j + log w``, value ``v̄_j`` (this call's mean key and value of the cluster,
:func:`~sparsevid.cluster_plan.cluster_means`), with ``log w`` the (batch, head)'s gate
(:func:`~sparsevid.tail.decide_cluster_tail`: read here, decided there; ``-inf`` drops the terms).
Differentiable in q, k and v (exact keys and the means).
"""

from __future__ import annotations

import torch

from ..cluster_plan import ClusterPlan, cluster_means
from .reference import _attend

__all__ = ["sparse_attention_reference_clusters"]

_ROWS = 64  # query rows per unit: a cluster's rows share one gather of its keys; padding stays under 2x


def sparse_attention_reference_clusters(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ClusterPlan,
                                        scale: float, gate: torch.Tensor | None = None,
                                        means: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``sparse_attention(q, k, v, plan, tail="centroid" if gate is not None else None)`` for a ClusterPlan.

    Args:
        q, k, v (Tensor): ``(B, H, L, D)``, one dtype and device (inputs already validated).
        plan (ClusterPlan): broadcasts to q's batch and heads.
        scale (float): softmax scale.
        gate (Tensor | None): float32 ``(B, H)``: add the cluster tail (one term per dropped key cluster), each
            (batch, head)'s logits shifted by its ``log w`` (``-inf``: none); ``None``: no tail.
        means (tuple | None): float32 ``(B, H, Ck, D)`` mean keys and mean values of this call's k and v over
            the plan's key clusters, where the caller has built them; ``None``:
            :func:`~sparsevid.cluster_plan.cluster_means` (read only with a ``gate``).

    Returns:
        Tensor ``(B, H, L, D)`` in q's dtype, original token order.
    """
    B, H, L, D = q.shape
    layout, device = plan.layout, q.device
    T, V = layout.text_tokens, layout.video_tokens
    text_offset = 0 if layout.text_first else V
    cq, ck, width_ids = plan.num_q_clusters, plan.num_k_clusters, plan.max_kept
    bh = B * H
    base = torch.arange(bh, device=device) * L  # where each (batch, head) starts in the flattened sequence
    q_order = plan.q_order.long().expand(B, H, V).reshape(bh, V)
    k_order = plan.k_order.long().expand(B, H, V).reshape(bh, V)
    q_offsets = plan.q_offsets.long().expand(B, H, cq + 1).reshape(bh, cq + 1)

    # per (batch, head, query cluster): start in k_order and cumulative size of each listed key cluster
    ids = plan.kv_clusters.long().clamp(0, ck - 1).expand(B, H, cq, width_ids).reshape(bh, cq, width_ids)
    listed = torch.arange(width_ids, device=device) < plan.kv_num_clusters.expand(B, H, cq).reshape(bh, cq, 1)
    flat_ids = ids.flatten(1)
    sizes = torch.where(listed, plan.k_sizes.expand(B, H, ck).reshape(bh, ck).gather(1, flat_ids).view_as(ids), 0)
    starts = plan.k_offsets.long().expand(B, H, ck + 1).reshape(bh, ck + 1).gather(1, flat_ids).view_as(ids)
    cum = sizes.cumsum(-1)

    # units: runs of <= _ROWS rows of one query cluster (video), or of the text rows; -1 pads a run
    q_sizes = q_offsets.diff(dim=-1)  # (bh, Cq)
    parts = (q_sizes + _ROWS - 1) // _ROWS
    unit_cluster = torch.repeat_interleave(torch.arange(bh * cq, device=device), parts.flatten())
    first_part = torch.repeat_interleave(parts.flatten().cumsum(0) - parts.flatten(), parts.flatten())
    part = torch.arange(unit_cluster.numel(), device=device) - first_part
    u_bh, u_c = unit_cluster // cq, unit_cluster % cq
    pos = q_offsets[u_bh, u_c, None] + part[:, None] * _ROWS + torch.arange(_ROWS, device=device)
    rows = torch.where(pos < q_offsets[u_bh, u_c + 1, None],
                       base[u_bh, None] + q_order[u_bh[:, None], pos.clamp(max=V - 1)], -1)
    widths = T + cum[u_bh, u_c, -1]
    if T:
        text_parts = (T + _ROWS - 1) // _ROWS
        t_bh = torch.arange(bh, device=device).repeat_interleave(text_parts)
        t_pos = (torch.arange(text_parts, device=device).repeat(bh)[:, None] * _ROWS
                 + torch.arange(_ROWS, device=device))
        rows = torch.cat([rows, torch.where(t_pos < T, base[t_bh, None] + text_offset + t_pos, -1)])
        u_bh = torch.cat([u_bh, t_bh])
        u_c = torch.cat([u_c, torch.full_like(t_bh, -1)])  # -1: a text unit
        widths = torch.cat([widths, torch.full_like(t_bh, L)])

    def keys(units: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, c = u_bh[units], u_c[units]
        p = torch.arange(width, device=device)
        cum_u, sizes_u, starts_u = (t[b, c.clamp(min=0)] for t in (cum, sizes, starts))  # (n, W)
        pv = (p - T).clamp(min=0).expand(len(units), width).contiguous()  # position among the cluster keys
        r = torch.searchsorted(cum_u.contiguous(), pv, right=True).clamp(max=width_ids - 1)
        at = starts_u.gather(-1, r) + pv - (cum_u.gather(-1, r) - sizes_u.gather(-1, r))
        tok = k_order[b[:, None], at.clamp(0, V - 1)]
        if T:
            tok = torch.where(p < T, text_offset + p, tok)  # a video unit's text keys come first
        tok = torch.where(c[:, None] < 0, p, tok)  # a text unit keeps every key, in order
        return (base[b, None] + tok).view(1, 1, -1, width), (p < widths[units, None]).view(1, 1, -1, width)

    if gate is None:
        tail = None
    else:
        means = (cluster_means(k, plan), cluster_means(v, plan)) if means is None else means
        tail = _centroid_terms(plan, *means, u_bh, u_c, scale, gate.reshape(bh))
    flat = [t.reshape(1, 1, bh * L, D) for t in (q, k, v)]
    out = _attend(*flat, rows, widths.view(1, 1, -1), keys, 1, scale, tail=tail)
    return out.view(B, H, L, D)


def _centroid_terms(plan: ClusterPlan, k_means: torch.Tensor, values: torch.Tensor, u_bh: torch.Tensor,
                    u_c: torch.Tensor, scale: float, gate: torch.Tensor):
    """``terms(qg, units) -> (logits (1, 1, n, rows, Ck), values (1, 1, n, Ck, D))`` for ``_attend``: each key
    cluster a unit's query cluster drops (non-empty), as one softmax column shifted by its (batch, head)'s
    ``gate`` (float32 ``(B * H,)``), key ``k_means`` and value ``values`` (float32 ``(B, H, Ck, D)``); kept clusters
    and text units get ``-inf``."""
    B, H = values.shape[:2]
    ck = plan.num_k_clusters
    means = k_means.reshape(B * H, ck, -1)
    log_n = plan.k_sizes.expand(B, H, ck).reshape(B * H, ck).float().log()  # -inf: an empty cluster never enters
    dropped = ~plan.kept_clusters().expand(B, H, -1, ck).reshape(B * H, -1, ck)  # (BH, Cq, Ck)
    values = values.reshape(B * H, ck, -1)

    def terms(qg, units):
        b, c = u_bh[units], u_c[units]
        logits = torch.matmul(qg, means[b].transpose(-1, -2)) * scale + (log_n[b] + gate[b, None]).unsqueeze(-2)
        drop = dropped[b, c.clamp(min=0)] & (c >= 0).unsqueeze(-1)  # (n, Ck)
        return logits.masked_fill(~drop.unsqueeze(-2), float("-inf")), values[b].unsqueeze(0).unsqueeze(0)

    return terms
