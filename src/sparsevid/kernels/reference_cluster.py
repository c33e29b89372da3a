"""A :class:`~sparsevid.cluster_plan.ClusterPlan` in plain PyTorch: the CPU path and the oracle twin of the
clustered kernels.

Every query row gathers its kept keys — the text keys, then the tokens of the key clusters its query cluster
keeps, cluster by cluster in ``k_order`` — and runs through the reference's one chunked core
(:func:`~sparsevid.kernels.reference._attend`, one row per "block"), so memory stays O(L x kept). Text rows keep
every key. With the cluster tail, every non-empty key cluster the row's cluster drops joins the same softmax as
one term: logit ``scale * q . k_means[j] + log n_j``, value :func:`~sparsevid.cluster_plan.cluster_value_means`.
Differentiable in q, k (exact keys) and v (exact keys and the mean values); the tail's mean keys are the plan's.
"""

from __future__ import annotations

import torch

from ..cluster_plan import ClusterPlan, cluster_value_means
from .reference import _attend

__all__ = ["sparse_attention_reference_clusters"]


def sparse_attention_reference_clusters(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ClusterPlan,
                                        scale: float, centroid_tail: bool = False) -> torch.Tensor:
    """``sparse_attention(q, k, v, plan, tail="centroid" if centroid_tail else None)`` for a ClusterPlan.

    Args:
        q, k, v (Tensor): ``(B, H, L, D)``, one dtype and device (inputs already validated).
        plan (ClusterPlan): broadcasts to q's batch and heads.
        scale (float): softmax scale.
        centroid_tail (bool): add the cluster tail (one term per dropped key cluster).

    Returns:
        Tensor ``(B, H, L, D)`` in q's dtype, original token order.
    """
    B, H, L, D = q.shape
    layout = plan.layout
    T, V = layout.text_tokens, layout.video_tokens
    text_offset = 0 if layout.text_first else V
    cq, ck, width_ids = plan.num_q_clusters, plan.num_k_clusters, plan.max_kept
    q_lab = plan.q_labels().expand(B, H, L)  # -1: text row
    k_order = plan.k_order.long().expand(B, H, V)

    # per query cluster: start in k_order and cumulative size of each listed key cluster (0 past the count)
    ids = plan.kv_clusters.long().clamp(0, ck - 1).expand(B, H, cq, width_ids)
    listed = torch.arange(width_ids, device=q.device) < plan.kv_num_clusters.unsqueeze(-1)
    sizes = torch.where(listed, plan.k_sizes.expand(B, H, ck).gather(2, ids.flatten(2)).view_as(ids), 0)
    starts = plan.k_offsets.long().expand(B, H, ck + 1).gather(2, ids.flatten(2)).view_as(ids)
    cum = sizes.cumsum(-1)
    kept = (cum[..., -1] + T).gather(2, q_lab.clamp(min=0))  # (B, H, L): keys of each video row
    counts = torch.where(q_lab >= 0, kept, L)

    def keys(rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        lab = q_lab[:, :, rows]  # (B, H, c)
        p = torch.arange(width, device=q.device)
        at = lab.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, width_ids)
        cum_r, sizes_r, starts_r = (t.gather(2, at) for t in (cum, sizes, starts))  # (B, H, c, W)
        pv = (p - T).clamp(min=0).expand(*lab.shape, width).contiguous()  # position among the cluster keys
        r = torch.searchsorted(cum_r.contiguous(), pv, right=True).clamp(max=width_ids - 1)
        pos = starts_r.gather(-1, r) + pv - (cum_r.gather(-1, r) - sizes_r.gather(-1, r))
        tok = k_order.gather(2, pos.clamp(0, V - 1).flatten(2)).view_as(pos)
        if T:
            tok = torch.where(p < T, text_offset + p, tok)  # a video row's text keys come first
        tok = torch.where(lab.unsqueeze(-1) < 0, p, tok)  # a text row keeps every key, in order
        return tok, p < counts[:, :, rows, None]

    tail = _centroid_terms(plan, v, q_lab, scale) if centroid_tail else None
    slots = torch.arange(L, device=q.device).view(L, 1)
    return _attend(q, k, v, slots, counts, keys, 1, scale, tail=tail)


def _centroid_terms(plan: ClusterPlan, v: torch.Tensor, q_lab: torch.Tensor, scale: float):
    """``terms(qg, rows) -> (logits (B, H, c, 1, Ck), values (B, H, 1, Ck, D))`` for ``_attend``: each key cluster
    the row's query cluster drops (non-empty), as one softmax column; kept clusters and text rows get ``-inf``."""
    B, H = q_lab.shape[:2]
    ck = plan.num_k_clusters
    means = plan.k_means.expand(B, H, ck, -1)
    log_n = plan.k_sizes.expand(B, H, ck).float().log()  # -inf: an empty cluster never enters
    dropped = ~plan.kept_clusters().expand(B, H, -1, ck)  # (B, H, Cq, Ck)
    values = cluster_value_means(v, plan).unsqueeze(2)

    def terms(qg, rows):
        lab = q_lab[:, :, rows]  # (B, H, c)
        logits = torch.matmul(qg, means.unsqueeze(2).transpose(-1, -2)) * scale + log_n[:, :, None, None]
        drop = dropped.gather(2, lab.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, ck)) & (lab >= 0).unsqueeze(-1)
        return logits.masked_fill(~drop.unsqueeze(-2), float("-inf")), values

    return terms
