"""``clustered`` — the clustered layout (SVG2, arXiv 2505.18875): per (batch, head), k-means of the video
queries and of the video keys into variable-size clusters; each query cluster keeps the key clusters with the
most estimated attention mass. Returns a :class:`~sparsevid.cluster_plan.ClusterPlan`.

Clustering: Lloyd iterations, a fixed count (no convergence test, so nothing reads the device in the loop):
assignment to the nearest centroid (``argmin_c ||c||^2 - 2 x.c``, a batched matmul, or ``flash-kmeans``'
Triton kernel where it is installed and the tensors are on CUDA, :func:`_assigner`), update by segment means;
an empty cluster keeps its previous centroid. Cold start: a seeded subsample of the tokens (the same on every
device); warm start: ``centroids=`` of the previous call of the same layer and CFG branch (the integration keeps
them), which needs fewer iterations.

Equal-size query clusters (``q_partition="kdtree"``): a k-d tree over the queries' channels of largest variance
cuts the video queries of each (batch, head) into ``q_clusters`` clusters of ``floor`` or ``ceil(V / q_clusters)``
rows, so the kernel's query tiles are full (the tile height follows the size: ``ClusterPlan.max_q_size``). Each
level sorts every node's rows along the coordinate of largest spread inside the node and splits it at its middle
leaf; no iterations, no warm start. On testbed-l's captured attention (held-out case 0, step 4 of 20, layers 1 and 5,
CPU, 512 clusters of 32 rows, density 0.1, cluster tail on), the attention error vs dense was 0.099 with k-d query
clusters against 0.102 with k-means ones (with the tree over principal coordinates: 0.100, and 0.106 with 64-row
k-d clusters); k-d KEY clusters lost (0.106 alone, 0.116 on both sides), so keys stay k-means.

Selection, per query cluster ``c`` (mean query ``q̄_c``) over key clusters ``j`` (mean key ``k̄_j``, size
``n_j``): the estimated share of the cluster's attention on ``j`` is ``softmax_j(scale q̄_c.k̄_j + log n_j)``.
The key clusters holding the cluster's own tokens are always kept (every query keeps its own key cluster);
the others are taken by decreasing estimate until the kept key TOKENS reach ``density * V`` (``density``: the
cluster whose half would overshoot is left) or the estimated mass reaches ``mass``. Text tokens are dense both
ways and not clustered, so ``plan.density`` is above ``density`` by the text rows and columns and by the
forced own clusters.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from functools import lru_cache

import torch

from ..cluster_plan import ClusterPlan, _check_centroids
from ..kernels.csr import dense_to_csr
from . import TokenCountError, register_planner
from ._select import _DEFAULT_DENSITY

# Default cluster counts: one cluster per this many video tokens, at most _MAX_CLUSTERS (the prototype's 512 at
# 16k tokens). Measured on the small testbed's captured q/k/v (4096 tokens, 8 layers, step 8 of 10, CPU), rel-L2
# error vs dense at density 0.1 with the cluster tail: 0.053 / 0.031 / 0.018 at one cluster per 64 / 32 / 16
# tokens (draft: 0.262); the tail's and the clustering's cost grow with the count.
_TOKENS_PER_CLUSTER = 32
_MAX_CLUSTERS = 512
# Lloyd iterations by default: from a subsample (cold) and from the previous call's centroids (warm). Measured on
# the small testbed's keys (128 clusters): the cold objective after 1 / 2 / 4 / 8 / 16 iterations is 1.26-1.29 /
# 1.13-1.14 / 1.06 / 1.01-1.02 / 1.00 times the converged one; warm from the previous step, 2 iterations land
# within 1% of the cold start (tests/test_clustered.py).
_COLD_ITERS = 8
_WARM_ITERS = 2
# Channels the k-d query partition splits on: each head's _KD_COORDS of largest variance. On testbed-l's captured
# attention (above) they scored as all 128 channels did (0.0993 / 0.0993) and as the top 16 principal coordinates
# (0.100; 8 of them: 0.110), without an eigendecomposition (whose CUDA solver reads its status on the host).
_KD_COORDS = 16
PARTITIONS = ("kmeans", "kdtree")
# Score elements (float32) per chunk of the torch assignment: ~64 MiB.
_CHUNK_ELEMENTS = 1 << 24


# replanned every 4 steps under sparsevid.apply by default: on testbed-l (8 held-out cases, 20 steps, H100,
# bench pareto) the clustered tail at 0.1 scored 29.72 dB replanning every 4 steps vs 29.73 every step, and the
# Wan2.1-1.3B forward ran 0.99x native instead of 0.84x (k-means is most of a plan's cost)
@register_planner("clustered", budgets=("density", "mass"), default=("density", _DEFAULT_DENSITY), replan_every=4)
def clustered(q, k, layout, *, density=None, mass=None, q_clusters: int | None = None,
              k_clusters: int | None = None, iters: int | None = None, centroids=None, seed: int = 0,
              q_partition: str = "kmeans") -> ClusterPlan:
    """Clustered plan: k-means of queries and keys per (batch, head), key clusters kept by estimated mass.

    Options:
        q_clusters, k_clusters (int): clusters of the video queries / keys per (batch, head), >= 1 and at most
            the video tokens; default one per 32 video tokens, at most 512.
        iters (int): Lloyd iterations, >= 1; default 8 from a cold start, 2 from ``centroids``.
        centroids (tuple): ``plan.centroids`` of a previous plan of the same layer and CFG branch (warm start);
            shapes ``(B, H, q_clusters, D)`` and ``(B, H, k_clusters, D)``.
        seed (int): in ``[0, 2**63)``: the cold start's subsample.
        q_partition (str): ``"kmeans"`` (variable sizes) or ``"kdtree"`` (equal sizes, full kernel tiles; the query
            centroids of ``centroids`` are then not read).
    """
    check_options(q_clusters=q_clusters, k_clusters=k_clusters, iters=iters, seed=seed, q_partition=q_partition)
    B, H, L, D = q.shape
    V, off = layout.video_tokens, (layout.text_tokens if layout.text_first else 0)
    counts = {}
    for name, value in (("q_clusters", q_clusters), ("k_clusters", k_clusters)):
        if value is not None and value > V:
            raise TokenCountError(name, f"Expect {name} <= {V} (the video tokens of {layout}) but got {name}={value}; "
                                        "use fewer clusters")
        counts[name] = value if value is not None else default_clusters(V)
    cq, ck = counts["q_clusters"], counts["k_clusters"]
    if centroids is not None:
        _check_centroids(centroids, (B, H, cq, D), (B, H, ck, D), q.device)
    if iters is None:
        iters = _COLD_ITERS if centroids is None else _WARM_ITERS
    if density is None and mass is None:
        density = _DEFAULT_DENSITY

    xq, xk = q[:, :, off:off + V], k[:, :, off:off + V]
    if centroids is None:
        init_q, init_k = (_subsample(x, c, seed + i) for i, (x, c) in enumerate(((xq, cq), (xk, ck))))
    else:
        init_q, init_k = (c.float() for c in centroids)
    k_lab, k_means, k_cent = kmeans(xk, init_k, iters)
    k_sizes = _sizes(k_lab, ck)
    if q_partition == "kdtree":
        xqf = xq.float()  # one copy for the partition and the means
        q_lab, position, bounds = kd_partition(xqf, cq)
        q_means, q_sizes = _segment_means(xqf, q_lab, cq)
        q_cent, max_q_size = q_means, -(-V // cq)
        q_order = (position + off).to(torch.int32)
        q_offsets = bounds.to(torch.int32).expand(B, H, cq + 1).contiguous()
    else:
        q_lab, q_means, q_cent = kmeans(xq, init_q, iters)
        q_sizes, max_q_size = _sizes(q_lab, cq), None
        q_order, q_offsets = _order(q_lab, q_sizes, off)

    keep = _select(q_means, k_means, q_lab, k_lab, q_sizes, k_sizes, V, density, mass)
    num, ids = dense_to_csr(keep, width=ck)  # full width: no host read of the longest row
    k_order, k_offsets = _order(k_lab, k_sizes, off)
    return ClusterPlan(layout, q_order, q_offsets, k_order, k_offsets, num, ids, k_means,
                       centroids=(q_cent, k_cent), method="clustered", trusted=True, max_q_size=max_q_size)


def check_options(*, q_clusters=None, k_clusters=None, iters=None, seed=0, q_partition="kmeans") -> None:
    """What no layout can take (checked before the tokens are seen): counts and iterations ints >= 1 (or
    ``None``: the defaults), ``seed`` an int in ``[0, 2**63)``, ``q_partition`` one of :data:`PARTITIONS`."""
    if q_partition not in PARTITIONS:
        raise ValueError(f"Expect q_partition in {PARTITIONS} but got {q_partition!r}")
    for name, value in (("q_clusters", q_clusters), ("k_clusters", k_clusters), ("iters", iters)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"Expect {name} to be an int >= 1 (or None: the default) but got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"Expect seed to be an int in [0, 2**63) but got {seed!r}")


def default_clusters(video_tokens: int) -> int:
    """The default cluster count for ``video_tokens`` tokens: one per 32, at least 1, at most 512."""
    return max(1, min(_MAX_CLUSTERS, video_tokens // _TOKENS_PER_CLUSTER))


# ---------------------------------------------------------------------------------------------- k-means
def kmeans(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iters`` Lloyd iterations of the rows of ``x`` ``(B, H, N, D)`` from centroids ``init`` ``(B, H, C, D)``.

    Returns:
        labels: int64 ``(B, H, N)``, the last assignment;
        means: float32 ``(B, H, C, D)``, the exact mean of each cluster's members under ``labels`` (zeros when
            empty);
        centroids: float32 ``(B, H, C, D)``, ``means`` where a cluster has members, else its previous centroid.
    """
    xf = x.float()  # the one float32 copy: the segment means' input, and the torch engine's
    assign = _assigner(x, xf)
    centroids = init.float()
    for _ in range(iters):
        labels = assign(centroids)
        means, sizes = _segment_means(xf, labels, centroids.shape[2])
        centroids = torch.where(sizes.unsqueeze(-1) > 0, means, centroids)
    return labels, means, centroids


def _assigner(x: torch.Tensor, xf: torch.Tensor):
    """``assign(centroids) -> int64 (B, H, N)``: the nearest centroid of each row of ``x`` (squared Euclidean;
    ``xf``: ``x`` in float32).

    The engine: ``flash-kmeans``' Triton assignment kernel (the SVG2 authors' package) when it is installed and
    ``x`` is on CUDA with a power-of-two head dim (its kernel's tile), else a chunked float32 matmul.
    """
    B, H, N, D = x.shape
    if x.is_cuda and D & (D - 1) == 0 and _flash_kmeans() is not None:
        flat = x.reshape(B * H, N, D)
        x_sq = torch.linalg.vector_norm(xf, dim=-1).square().reshape(B * H, N)  # one reduction, no squared copy
        assign = _flash_kmeans()

        def flash(centroids):
            c = centroids.to(x.dtype).reshape(B * H, -1, D).contiguous()
            return assign(flat, c, x_sq).view(B, H, N).long()

        return flash

    def torch_assign(centroids):
        c_sq = centroids.square().sum(-1).unsqueeze(-2)  # (B, H, 1, C)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * centroids.shape[2]))
        labels = torch.empty(B, H, N, dtype=torch.long, device=x.device)
        for n0 in range(0, N, chunk):
            dist = c_sq - 2 * torch.matmul(xf[:, :, n0:n0 + chunk], centroids.transpose(-1, -2))
            labels[:, :, n0:n0 + chunk] = dist.argmin(-1)
        return labels

    return torch_assign


_FLASH: list = []


def _flash_kmeans():
    """``flash_kmeans``' ``euclid_assign_triton(x, centroids, x_sq)`` or ``None`` when not installed (checked
    once). Its ``batch_kmeans_Euclid`` tests convergence on the host every iteration; its assignment does not."""
    if not _FLASH:
        fn = None
        if importlib.util.find_spec("flash_kmeans") is not None:
            try:
                from flash_kmeans.assign_euclid_triton import euclid_assign_triton as fn
            except ImportError:  # another layout of the package: the torch engine
                fn = None
        _FLASH.append(fn)
    return _FLASH[0]


def _segment_means(x: torch.Tensor, labels: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 mean of the rows of ``x`` ``(B, H, N, D)`` per label (zeros when empty) and the sizes ``(B, H, C)``."""
    B, H, N, D = x.shape
    sums = torch.zeros(B, H, clusters, D, dtype=torch.float32, device=x.device)
    sums.scatter_add_(2, labels.unsqueeze(-1).expand(B, H, N, D), x)
    sizes = _sizes(labels, clusters)
    return sums / sizes.clamp(min=1).unsqueeze(-1).float(), sizes


def _sizes(labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """int64 ``(B, H, C)``: members of each cluster."""
    sizes = torch.zeros(*labels.shape[:2], clusters, dtype=torch.long, device=labels.device)
    return sizes.scatter_add_(2, labels, torch.ones_like(labels))


def _subsample(x: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """Cold-start centroids: ``clusters`` distinct rows of ``x`` ``(B, H, N, D)`` drawn with ``seed`` (a CPU
    generator: the same rows on every device), float32 ``(B, H, C, D)``."""
    return x[:, :, _subsample_rows(x.shape[2], clusters, seed, str(x.device))].float()


@lru_cache(maxsize=64)
def _subsample_rows(tokens: int, clusters: int, seed: int, device: str) -> torch.Tensor:
    # cached: the copy to the device waits for its stream, once per (size, seed, device) and not at every cold start
    with torch.inference_mode(False):
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(tokens, generator=generator)[:clusters].to(device)


# ---------------------------------------------------------------------------------------------- k-d partition
def kd_partition(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equal-size clusters of the rows of ``x`` ``(B, H, N, D)``: a k-d tree over each (batch, head)'s
    :data:`_KD_COORDS` channels of largest variance, ``clusters`` leaves of ``floor`` or ``ceil(N / clusters)`` rows.

    Returns:
        labels: int64 ``(B, H, N)``: the leaf of each row;
        position: int64 ``(B, H, N)``: the rows grouped by leaf (leaf ``c`` is ``position[..., bounds[c]:bounds[c +
            1]]``);
        bounds: int64 ``(clusters + 1,)``: ``c * N // clusters``, the same for every (batch, head).
    """
    B, H, N, D = x.shape
    xf = x.float()
    xc = xf - xf.mean(2, keepdim=True)
    r = min(_KD_COORDS, D)
    channels = xc.square().sum(2).topk(r, dim=-1).indices  # (B, H, r)
    z = xc.gather(3, channels.unsqueeze(2).expand(B, H, N, r))  # (B, H, N, r)
    position = torch.arange(N, device=x.device).expand(B, H, N)
    levels, bounds, leaf = _kd_tree(N, clusters, str(x.device))
    for segment, size in levels:  # every node of a level sorted along its widest coordinate, split at its middle
        S = size.shape[0]
        seg = segment.expand(B, H, N)
        mean = torch.zeros(B, H, S, r, device=x.device).index_add_(2, segment, z) / size[:, None]
        var = torch.zeros(B, H, S, r, device=x.device).index_add_(2, segment, z.square()) / size[:, None] - mean.square()
        widest = var.argmax(-1)  # (B, H, S)
        coord = widest.gather(2, seg).unsqueeze(-1)
        centred = z.gather(3, coord).squeeze(-1) - mean.gather(3, widest.unsqueeze(-1)).squeeze(-1).gather(2, seg)
        spread = var.gather(3, widest.unsqueeze(-1)).squeeze(-1).clamp(min=1e-12).sqrt().gather(2, seg)
        # one sort a level: the node id plus a monotone map of the coordinate into (0, 1), in float64
        step = (segment.double() + torch.sigmoid((centred / spread).double()) * 0.5 + 0.25).argsort(dim=-1)
        z = z.gather(2, step.unsqueeze(-1).expand(B, H, N, r))
        position = position.gather(2, step)
    labels = torch.empty_like(position).scatter_(2, position, leaf.expand(B, H, N))
    return labels, position, bounds


@lru_cache(maxsize=32)
def _kd_tree(tokens: int, clusters: int, device: str) -> tuple[list, torch.Tensor, torch.Tensor]:
    """The k-d tree's shape, from sizes alone (built once, on the host): per level that splits, each position's
    node (int64 ``(N,)``) and the nodes' sizes (float32); the leaf bounds ``c * N // clusters``; the leaf of each
    position (int64 ``(N,)``)."""
    with torch.inference_mode(False):
        bounds = [c * tokens // clusters for c in range(clusters + 1)]
        nodes, levels = [(0, clusters)], []
        while any(b - a > 1 for a, b in nodes):
            segment = torch.cat([torch.full((bounds[b] - bounds[a],), i) for i, (a, b) in enumerate(nodes)])
            size = torch.tensor([float(max(1, bounds[b] - bounds[a])) for a, b in nodes])
            levels.append((segment.to(device), size.to(device)))
            nodes = [half for a, b in nodes
                     for half in (((a, (a + b) // 2), ((a + b) // 2, b)) if b - a > 1 else ((a, b),))]
        bounds = torch.tensor(bounds)
        leaf = torch.repeat_interleave(torch.arange(clusters), bounds.diff())
        return levels, bounds.to(device), leaf.to(device)


# ---------------------------------------------------------------------------------------------- selection
def _select(q_means, k_means, q_lab, k_lab, q_sizes, k_sizes, V: int, density, mass) -> torch.Tensor:
    """bool ``(B, H, Cq, Ck)``: the key clusters each query cluster keeps (see the module docstring)."""
    B, H, cq, D = q_means.shape
    ck = k_means.shape[2]
    log_n = k_sizes.float().log()  # -inf for an empty cluster: never estimated, never taken
    logits = torch.matmul(q_means, k_means.transpose(-1, -2)) * (1.0 / math.sqrt(D)) + log_n.unsqueeze(-2)
    probs = torch.softmax(logits, dim=-1)  # (B, H, Cq, Ck)
    # own clusters: every (query cluster, key cluster) pair of one token
    pair = q_lab * ck + k_lab  # (B, H, V)
    forced = torch.zeros(B, H, cq * ck, dtype=torch.bool, device=q_means.device)
    forced = forced.scatter_(2, pair, True).view(B, H, cq, ck)
    if density is not None:
        gain = k_sizes.float().unsqueeze(-2).expand(B, H, cq, ck)
        remaining = density * V - (gain * forced).sum(-1, keepdim=True)
    else:
        gain = probs
        remaining = mass - (probs * forced).sum(-1, keepdim=True)
    candidate = ~forced & (k_sizes > 0).unsqueeze(-2)
    order = torch.where(candidate, probs, -1.0).argsort(dim=-1, descending=True)
    g = gain.gather(-1, order)
    ok = candidate.gather(-1, order)
    before = torch.cumsum(g * ok, dim=-1) - g * ok
    take = ok & ((before + g / 2 <= remaining) if density is not None else (before < remaining))
    # an empty query cluster (no rows, nothing forced) still lists one key cluster: every list is non-empty
    take[..., 0] |= ok[..., 0] & (q_sizes == 0)
    return torch.zeros_like(forced).scatter_(-1, order, take) | forced


def _order(labels: torch.Tensor, sizes: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``(order (B, H, V), offsets (B, H, C + 1))``: original token indices grouped by cluster."""
    order = labels.argsort(dim=-1, stable=True) + offset
    offsets = torch.nn.functional.pad(sizes.cumsum(-1), (1, 0))
    return order.to(torch.int32), offsets.to(torch.int32)
