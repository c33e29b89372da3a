"""Segment means over a clustered plan's key clusters: the cluster tail's mean values.

A :class:`~sparsevid.ClusterPlan` stores the mean KEY of each key cluster (it is built from q and k), never
the mean VALUE: that one is computed from each call's v, here, by every backend that runs the cluster tail.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``V`` video tokens, ``Ck`` key clusters;
``B'``, ``H'`` the plan's batch and heads (equal to v's, or 1 = broadcast).
"""

from __future__ import annotations

import torch

__all__ = ["cluster_value_means"]


def cluster_value_means(v: torch.Tensor, k_order: torch.Tensor, k_offsets: torch.Tensor) -> torch.Tensor:
    """The mean value row of each key cluster.

    Args:
        v (Tensor): ``(B, H, L, D)``, any strides and float dtype.
        k_order (Tensor): int ``(B', H', V)``: original token indices of the video keys, grouped by key cluster.
        k_offsets (Tensor): int ``(B', H', Ck + 1)``: cluster ``j`` holds ``k_order[..., k_offsets[j]:k_offsets[j+1]]``.

    Returns:
        Tensor: float32 ``(B, H, Ck, D)``, contiguous; zeros for an empty cluster. Sums are taken in float32.
    """
    B, H, _, D = v.shape
    nv = k_order.shape[-1]
    ck = k_offsets.shape[-1] - 1
    order = k_order.long().expand(B, H, nv)
    offsets = k_offsets.long()
    rows = torch.gather(v, 2, order[..., None].expand(B, H, nv, D)).float()  # (B, H, V, D), cluster-sorted
    # cluster of each sorted position: how many clusters end at or before it (empty clusters end where they start)
    pos = torch.arange(nv, device=v.device).expand(*offsets.shape[:2], nv).contiguous()
    labels = torch.searchsorted(offsets[..., 1:].contiguous(), pos, right=True).expand(B, H, nv)
    segment = (torch.arange(B * H, device=v.device).view(B, H, 1) * ck + labels).reshape(-1)
    sums = torch.zeros(B * H * ck, D, dtype=torch.float32, device=v.device).index_add_(0, segment, rows.reshape(-1, D))
    sizes = offsets.diff(dim=-1).clamp_min(1).expand(B, H, ck)
    return sums.view(B, H, ck, D) / sizes[..., None]
