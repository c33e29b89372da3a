"""``ClusterPlan``: a clustered attention plan — per head, variable-size clusters of the video queries and
keys, and which key clusters each query cluster computes exactly. Data only: the ``clustered`` planner builds
it (:mod:`sparsevid.planners.clustered`), backends run it.

Shape legend: ``B'``, ``H'`` the plan's batch and heads (equal to q's, or 1 = broadcast), ``L`` tokens,
``V`` video tokens, ``T`` text tokens, ``Cq``/``Ck`` query/key clusters, ``D`` head dim.
"""

from __future__ import annotations

import torch

from .layout import VideoLayout
from .plan import PlanData, _describe, batch_head_slices

__all__ = ["ClusterPlan", "cluster_means"]


class ClusterPlan(PlanData):
    r"""A clustered attention plan over a :class:`VideoLayout`'s video tokens (SVG2, arXiv 2505.18875).

    Basics
    ------
    The ``V`` video tokens are clustered twice per (batch, head): as queries into ``Cq`` clusters and as keys
    into ``Ck`` clusters, each of any size (empty ones allowed). Text tokens are not clustered: text queries
    attend to every key and every video query to every text key. Fields (int32 unless said, one device):

    - ``q_order`` ``(B', H', V)``: ORIGINAL token indices of the video tokens grouped by query cluster
      (cluster 0's first); ``q_offsets`` ``(B', H', Cq + 1)``: cluster ``c`` holds
      ``q_order[..., q_offsets[c]:q_offsets[c + 1]]`` (``q_offsets[0] = 0``, ``q_offsets[Cq] = V``).
    - ``k_order`` ``(B', H', V)``, ``k_offsets`` ``(B', H', Ck + 1)``: the same for keys.
    - ``kv_num_clusters`` ``(B', H', Cq)``: how many key clusters query cluster ``c`` computes exactly;
      ``kv_clusters`` ``(B', H', Cq, max_kept)``: their ids, strictly ascending in the first
      ``kv_num_clusters`` entries (the rest unspecified).
    - ``k_means`` float32 ``(B', H', Ck, D)``: the exact mean key of each key cluster's members in the keys the
      plan was made from (zeros when empty): what the selection estimated from; the sizes are
      ``k_offsets.diff(-1)``. The tail's mean keys and values are this call's (:func:`cluster_means` of k and
      v), never stored: equal to ``k_means`` for a fresh plan, fresh for one reused across steps.
    - ``centroids``: ``(q_centroids (B', H', Cq, D), k_centroids (B', H', Ck, D))`` float32 (or ``None``
      for a plan built by hand), what ``sparsevid.plan(..., centroids=plan.centroids)`` takes to warm-start
      the next call of the same layer and CFG branch.
    - ``max_q_size`` (int or ``None``): a bound on every query cluster's size that the planner knows from shapes
      alone (equal-size query clusters, ``q_partition="kdtree"``); the ``triton`` backend's query tiles take that
      height (the smallest of 16, 32, 64, 128 that holds it), so they are full. ``None``: unknown (tiles of 64).

    The token mask (original order) is rebuilt by::

        mask = ones(B', H', L, L, dtype=bool)                       # text rows and columns stay True
        mask[:, :, video, video] = False
        for b, h, c in product(range(B'), range(H'), range(Cq)):
            rows = q_order[b, h, q_offsets[b, h, c]:q_offsets[b, h, c + 1]]
            for j in kv_clusters[b, h, c, :kv_num_clusters[b, h, c]]:
                cols = k_order[b, h, k_offsets[b, h, j]:k_offsets[b, h, j + 1]]
                mask[b, h, rows[:, None], cols[None, :]] = True

    Details
    -------
    - Invariants (:meth:`validate`, host syncs): orders are permutations of the video tokens, offsets run
      from 0 to ``V`` without decreasing, cluster ids in range and ascending, and every query keeps the key
      cluster that holds its own token (so no softmax row is empty, also with ``tail=None``).
    - ``density`` counts the computed score entries over ``L**2``, text rows and columns included.
    - Execution (``sparsevid.sparse_attention``): ``tail=None`` is SDPA under :meth:`to_mask`; the default
      ``tail="centroid"`` adds, for every non-empty key cluster ``j`` a query's cluster does not keep, one
      term of logit ``scale * q . k̄_j + log n_j`` and value ``v̄_j`` (this call's means) to the same softmax, weighted
      per (batch, head) by the call's decision from exact probe rows (``sparsevid.tail.decide_cluster_tail``).
    """

    layout: VideoLayout
    method: str

    _FIELDS = ("q_order", "q_offsets", "k_order", "k_offsets", "kv_num_clusters", "kv_clusters", "k_means")

    def __init__(self, layout: VideoLayout, q_order: torch.Tensor, q_offsets: torch.Tensor, k_order: torch.Tensor,
                 k_offsets: torch.Tensor, kv_num_clusters: torch.Tensor, kv_clusters: torch.Tensor,
                 k_means: torch.Tensor, centroids: tuple[torch.Tensor, torch.Tensor] | None = None,
                 method: str = "custom", *, trusted: bool = False, max_q_size: int | None = None):
        super().__init__(trusted=trusted)
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"Expect layout to be a VideoLayout but got {type(layout).__name__}")
        tensors = dict(q_order=q_order, q_offsets=q_offsets, k_order=k_order, k_offsets=k_offsets,
                       kv_num_clusters=kv_num_clusters, kv_clusters=kv_clusters, k_means=k_means)
        dims = dict(q_order=3, q_offsets=3, k_order=3, k_offsets=3, kv_num_clusters=3, kv_clusters=4, k_means=4)
        for name, t in tensors.items():
            dtype = torch.float32 if name == "k_means" else torch.int32
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != dims[name]:
                raise TypeError(f"Expect {name} to be a {dtype} tensor of {dims[name]} dims but got {_describe(t)}")
        V = layout.video_tokens
        bh = tuple(q_order.shape[:2])
        cq, ck = q_offsets.shape[-1] - 1, k_offsets.shape[-1] - 1
        expected = dict(q_order=(*bh, V), q_offsets=(*bh, cq + 1), k_order=(*bh, V), k_offsets=(*bh, ck + 1),
                        kv_num_clusters=(*bh, cq), kv_clusters=(*bh, cq, kv_clusters.shape[-1]),
                        k_means=(*bh, ck, k_means.shape[-1]))
        for name, t in tensors.items():
            if tuple(t.shape) != expected[name] or (name.endswith("offsets") and t.shape[-1] < 2):
                raise ValueError(f"Expect {name} of shape {expected[name]} (plan (B', H') = {bh}, V={V} video tokens "
                                 f"of {layout}, Cq={cq}, Ck={ck}, at least one cluster) but got {tuple(t.shape)}")
            if t.device != q_order.device:
                raise ValueError(f"Expect every plan tensor on one device but got q_order on {q_order.device} and "
                                 f"{name} on {t.device}")
        if kv_clusters.shape[-1] < 1:
            raise ValueError("Expect kv_clusters with max_kept >= 1 but got 0")
        if centroids is not None:
            _check_centroids(centroids, (*bh, cq, k_means.shape[-1]), (*bh, ck, k_means.shape[-1]), q_order.device)
            centroids = tuple(centroids)
        if max_q_size is not None and (isinstance(max_q_size, bool) or not isinstance(max_q_size, int)
                                       or not 1 <= max_q_size <= V):
            raise ValueError(f"Expect max_q_size an int in [1, V={V}] or None but got {max_q_size!r}")
        self.layout = layout
        self.q_order, self.q_offsets, self.k_order, self.k_offsets = q_order, q_offsets, k_order, k_offsets
        self.kv_num_clusters, self.kv_clusters, self.k_means = kv_num_clusters, kv_clusters, k_means
        self.centroids = centroids
        self.max_q_size = max_q_size
        self.method = method
        self.keeps_everything = False  # backends may test it on any plan (dense shortcut): never for clusters
        self._views: dict[str, object] = {}

    def _view(self, key: str, build):
        """``build()``, one of the plan's own derived views (labels, keep masks), computed once and kept."""
        if key not in self._views:
            self._views[key] = build()
        return self._views[key]

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int]:
        """``(B', H')`` of the plan (1 where it broadcasts)."""
        return tuple(self.q_order.shape[:2])

    @property
    def device(self) -> torch.device:
        return self.q_order.device

    @property
    def num_q_clusters(self) -> int:
        return self.q_offsets.shape[-1] - 1

    @property
    def num_k_clusters(self) -> int:
        return self.k_offsets.shape[-1] - 1

    @property
    def max_kept(self) -> int:
        return self.kv_clusters.shape[-1]

    @property
    def q_sizes(self) -> torch.Tensor:
        """int64 ``(B', H', Cq)``: tokens of each query cluster."""
        return self._view("q_sizes", lambda: self.q_offsets.long().diff(dim=-1))

    @property
    def k_sizes(self) -> torch.Tensor:
        """int64 ``(B', H', Ck)``: tokens of each key cluster."""
        return self._view("k_sizes", lambda: self.k_offsets.long().diff(dim=-1))  # read by every tail call

    @property
    def log_k_sizes(self) -> torch.Tensor:
        """float32 ``(B', H', Ck)``: log of each key cluster's size, ``-inf`` for an empty one (a centroid term's
        log-weight; read by every tail call)."""
        return self._view("log_k_sizes", lambda: self.k_sizes.float().log())

    @property
    def video_offset(self) -> int:
        """Original index of the first video token (the video tokens are one contiguous run)."""
        return self.layout.text_tokens if self.layout.text_first else 0

    # ------------------------------------------------------------------ derived views
    def q_labels(self) -> torch.Tensor:
        """int64 ``(B', H', L)``: the query cluster of each original token, ``-1`` for text tokens."""
        return self._view("q_labels", lambda: _labels(self.q_order, self.q_offsets, self.layout.num_tokens))

    def k_labels(self) -> torch.Tensor:
        """int64 ``(B', H', L)``: the key cluster of each original token, ``-1`` for text tokens."""
        return self._view("k_labels", lambda: _labels(self.k_order, self.k_offsets, self.layout.num_tokens))

    def kept_clusters(self) -> torch.Tensor:
        """bool ``(B', H', Cq, Ck)``: True where query cluster ``c`` computes key cluster ``j`` exactly."""

        def build():
            ck = self.num_k_clusters
            valid = torch.arange(self.max_kept, device=self.device) < self.kv_num_clusters.unsqueeze(-1)
            hits = torch.zeros(*self.kv_num_clusters.shape, ck + 1, dtype=torch.int32, device=self.device)
            # entries past the count go to a dump column; scatter_add: a repeated id must not erase a kept one
            idx = torch.where(valid, self.kv_clusters.long().clamp(0, ck - 1), ck)
            return (hits.scatter_add_(-1, idx, torch.ones_like(idx, dtype=torch.int32)) > 0)[..., :ck]

        return self._view("kept_clusters", build)

    def kept_of_rows(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """bool ``(B', H', P, Ck)``: the key clusters the query tokens ``rows`` (int64 ``(P,)``, original indices of
        video tokens) keep (text keys: always); built once per plan and kept under ``name`` (a fixed sample read
        every call: the tail decision's probe rows, with :meth:`k_labels` for the keys)."""

        def build():
            # (B', H', P); not through q_labels(): that view would stay held with the plan for this one gather
            clusters = _labels(self.q_order, self.q_offsets, self.layout.num_tokens)[:, :, rows]
            table = self.kept_clusters()
            return table.gather(2, clusters.unsqueeze(-1).expand(-1, -1, -1, table.shape[-1]))

        return self._view(name, build)

    def kept_tokens(self) -> torch.Tensor:
        """int64 ``(B', H', Cq)``: video key tokens each query cluster computes exactly (text keys not counted)."""
        return self._view("kept_tokens", lambda: (self.kept_clusters().long() * self.k_sizes.unsqueeze(-2)).sum(-1))

    @property
    def density(self) -> float:
        """Fraction of the ``L x L`` score entries computed exactly, averaged over batch and heads."""
        return float(self.density_per_head().mean())

    def density_per_head(self) -> torch.Tensor:
        """float64 ``(B', H')``: text rows keep ``L`` keys, a video query of cluster ``c`` the ``T`` text keys
        plus its kept key clusters' tokens."""
        L, T = self.layout.num_tokens, self.layout.text_tokens
        video_rows = (self.q_sizes.double() * (self.kept_tokens().double() + T)).sum(-1)
        return (video_rows + T * L) / float(L) ** 2

    # ------------------------------------------------------------------ conversions
    def to_mask(self) -> torch.Tensor:
        """bool ``(B', H', L, L)`` in the original token order; True = score computed exactly. For small ``L``."""
        cq, ck = self.q_labels(), self.k_labels()
        kept = self.kept_clusters()
        B, H, L = cq.shape
        rows = kept.gather(2, cq.clamp(min=0).unsqueeze(-1).expand(B, H, L, kept.shape[-1]))  # (B', H', L, Ck)
        mask = rows.gather(3, ck.clamp(min=0).unsqueeze(-2).expand(B, H, L, L))
        return mask | (cq < 0).unsqueeze(-1) | (ck < 0).unsqueeze(-2)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "ClusterPlan":
        """Check the invariants in the class docstring; raise ``ValueError`` naming the first broken one."""
        V, off = self.layout.video_tokens, self.video_offset
        video = torch.arange(off, off + V, device=self.device, dtype=torch.int32)
        for side in ("q", "k"):
            order, offsets = getattr(self, f"{side}_order"), getattr(self, f"{side}_offsets")
            if not bool((order.sort(dim=-1).values == video).all()):
                raise ValueError(f"Expect {side}_order to be a permutation of the video tokens [{off}, {off + V}) "
                                 "in every (batch, head)")
            if not (bool((offsets[..., 0] == 0).all()) and bool((offsets[..., -1] == V).all())
                    and bool((offsets.diff(dim=-1) >= 0).all())):
                raise ValueError(f"Expect {side}_offsets to run from 0 to V={V} without decreasing")
        ck = self.num_k_clusters
        counts = self.kv_num_clusters
        if bool((counts < 1).any()) or bool((counts > min(ck, self.max_kept)).any()):
            raise ValueError(f"Expect 1 <= kv_num_clusters <= min(Ck={ck}, max_kept={self.max_kept}) but got values in "
                             f"[{int(counts.min())}, {int(counts.max())}]")
        valid = torch.arange(self.max_kept, device=self.device) < counts.unsqueeze(-1)
        ids = self.kv_clusters.long()
        if bool(((ids < 0) | (ids >= ck))[valid].any()):
            raise ValueError(f"Expect kv_clusters in [0, {ck}) but found out-of-range entries")
        if bool((ids[..., 1:] <= ids[..., :-1])[valid[..., 1:]].any()):
            raise ValueError("Expect kv_clusters strictly ascending (sorted, no duplicates) within kv_num_clusters")
        q_lab, k_lab = self.q_labels(), self.k_labels()
        is_video = q_lab[..., off:off + V] >= 0
        own = self.kept_clusters().flatten(-2).gather(
            -1, q_lab[..., off:off + V] * ck + k_lab[..., off:off + V])  # (B', H', V)
        if not (bool(is_video.all()) and bool(own.all())):
            raise ValueError("Expect every query to keep the key cluster holding its own token but some do not")
        if not bool(torch.isfinite(self.k_means).all()):
            raise ValueError("Expect finite k_means but got NaN/Inf entries")
        if self.max_q_size is not None and (largest := int(self.q_sizes.max())) > self.max_q_size:
            raise ValueError(f"Expect every query cluster within max_q_size={self.max_q_size} but the largest holds "
                             f"{largest}")
        self._trusted = True
        return self

    # ------------------------------------------------------------------ slicing, moving, printing
    def __getitem__(self, index):
        """Slice batch and heads: ``plan[b]``, ``plan[:, h]``, ``plan[-1]`` (integer indices keep the dimension)."""
        index = batch_head_slices(index, self.shape)
        if 0 in self.q_order[index].shape[:2]:
            raise IndexError(f"Expect a non-empty selection but plan{list(index)} of shape {self.shape} is empty")
        return self._like(lambda t: t[index])

    def to(self, device) -> "ClusterPlan":
        return self._like(lambda t: t.to(device))

    def _like(self, fn) -> "ClusterPlan":
        centroids = None if self.centroids is None else tuple(fn(c) for c in self.centroids)
        return ClusterPlan(self.layout, *(fn(getattr(self, name)) for name in self._FIELDS), centroids=centroids,
                           method=self.method, trusted=self._trusted, max_q_size=self.max_q_size)

    def to_string(self, grid_size: int = 20, limit: int = 4) -> str:
        """Per (batch, head): cluster counts and sizes, kept clusters, density, and an ASCII picture of the kept
        (query cluster, key cluster) pairs shrunk to ``grid_size``: █ every pair of the cell kept, ░ some."""
        kept = self.kept_clusters().float()
        B, H, cq, ck = kept.shape
        pooled = torch.nn.functional.adaptive_avg_pool2d(kept.reshape(B * H, 1, cq, ck),
                                                         (min(grid_size, cq), min(grid_size, ck))).reshape(B, H, -1, min(grid_size, ck))
        density = self.density_per_head()
        lines = []
        for n, (b, h) in enumerate((b, h) for b in range(B) for h in range(H)):
            if n == limit:
                lines.append(f"... {B * H - limit} more (batch, head) entries; use plan[b, h].to_string()")
                break
            qs, ks = self.q_sizes[b, h], self.k_sizes[b, h]
            lines.append(
                f"batch {b}, head {h}: density {float(density[b, h]):.1%}; {cq} query clusters (sizes "
                f"{int(qs.min())}-{int(qs.max())}), {ck} key clusters (sizes {int(ks.min())}-{int(ks.max())}, "
                f"{int((ks == 0).sum())} empty); kept key clusters per query cluster "
                f"{float(self.kv_num_clusters[b, h].float().mean()):.1f} on average")
            for row in pooled[b, h]:
                lines.append("".join("██" if v >= 1 - 1e-6 else "░░" if v > 0 else "  " for v in row.tolist()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"ClusterPlan(method={self.method!r}, shape={self.shape}, q_clusters={self.num_q_clusters}, "
                f"k_clusters={self.num_k_clusters}, max_kept={self.max_kept}, density={self.density:.2%}, "
                f"video_tokens={self.layout.video_tokens}, text_tokens={self.layout.text_tokens}, "
                f"head_dim={self.k_means.shape[-1]}, device={self.device})")

    def __str__(self) -> str:
        return f"{self!r}\n{self.to_string()}"


def _check_centroids(centroids, q_shape: tuple, k_shape: tuple, device) -> None:
    """``centroids`` must be ``(q_centroids, k_centroids)`` float32 tensors of the given shapes on ``device``."""
    if not isinstance(centroids, (tuple, list)) or len(centroids) != 2:
        raise TypeError(f"Expect centroids to be a (q_centroids, k_centroids) pair of tensors but got "
                        f"{type(centroids).__name__}")
    for name, c, shape in (("q_centroids", centroids[0], q_shape), ("k_centroids", centroids[1], k_shape)):
        if not isinstance(c, torch.Tensor) or not c.is_floating_point():
            raise TypeError(f"Expect centroids' {name} to be a float tensor but got {_describe(c)}")
        if tuple(c.shape) != tuple(shape):
            raise ValueError(f"Expect centroids' {name} of shape {tuple(shape)} but got {tuple(c.shape)}; pass the "
                             "centroids of a plan of the same layer, batch, heads and cluster counts")
        if c.device != torch.device(device):
            raise ValueError(f"Expect centroids' {name} on {device} but got {c.device}")


def _labels(order: torch.Tensor, offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 ``(B', H', L)``: the cluster of each original token (``-1`` off the order: text tokens)."""
    V = order.shape[-1]
    pos = torch.arange(V, device=order.device).expand(*order.shape[:2], V).contiguous()
    # the cluster of a sorted position: how many clusters end at or before it (empty ones end where they start)
    cluster = torch.searchsorted(offsets[..., 1:].long().contiguous(), pos, right=True)
    labels = torch.full((*order.shape[:2], num_tokens), -1, dtype=torch.long, device=order.device)
    return labels.scatter_(-1, order.long(), cluster)


def cluster_means(x: torch.Tensor, plan: ClusterPlan) -> torch.Tensor:
    """float32 ``(B, H, Ck, D)``, contiguous: the mean row of ``x`` ``(B, H, L, D)`` (any strides) over each key
    cluster of ``plan`` (zeros for an empty one). Of this call's k and v: the cluster tail's keys and values, for
    every backend (differentiable; the Triton twin is ``kernels.triton_cluster.cluster_means_triton``). Reads
    only ``plan.k_order`` and ``plan.k_offsets``; sums are taken in float32."""
    B, H, _, D = x.shape
    nv = plan.k_order.shape[-1]
    ck = plan.k_offsets.shape[-1] - 1
    order = plan.k_order.long().expand(B, H, nv)
    offsets = plan.k_offsets.long()
    rows = torch.gather(x, 2, order[..., None].expand(B, H, nv, D)).float()  # (B, H, V, D), cluster-sorted
    # cluster of each sorted position: how many clusters end at or before it (empty clusters end where they start)
    pos = torch.arange(nv, device=x.device).expand(*offsets.shape[:2], nv).contiguous()
    labels = torch.searchsorted(offsets[..., 1:].contiguous(), pos, right=True).expand(B, H, nv)
    segment = (torch.arange(B * H, device=x.device).view(B, H, 1) * ck + labels).reshape(-1)
    sums = torch.zeros(B * H * ck, D, dtype=torch.float32, device=x.device).index_add(0, segment, rows.reshape(-1, D))
    sizes = offsets.diff(dim=-1).clamp_min(1).expand(B, H, ck)
    return sums.view(B, H, ck, D) / sizes[..., None]
