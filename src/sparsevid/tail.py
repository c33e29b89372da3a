"""The tail: what happens to the key blocks a plan skips (execution, not planning).

A plan says which (query block, key block) pairs are computed exactly; everything else is the
*tail*. ``tail=None`` drops it: the kept probabilities are renormalised to 1 (the plain block-sparse
result, bit for bit). A summary method keeps it in the same softmax: every skipped key block (or
every ``group`` consecutive tile-order tokens of it) contributes one term, built from the k and v
of the current call, so a query row's probability mass outside its kept blocks is no longer thrown
away. The plan stays data; which terms are summaries follows from it (the groups of its skipped
blocks), and backends compute them beside the exact pass.

For a summary group ``g`` of ``n_g`` key tokens (mean key ``k̄_g``, mean value ``v̄_g``) and a query
row ``q_i`` (scale ``s``), the group enters the softmax of row ``i`` as one key with logit

    ``z_ig = s q_i·k̄_g + log n_g + min(½ s² Σ_d q_id² σ²_gd,  s |q_i| r_g)``

and value ``v̄_g``. ``n_g exp(s q_i·k̄_g)`` alone is the group's softmax mass when its keys are equal
(then the summary is exact, with constant values) and a lower bound otherwise (Jensen); the last
term is the second-order (Gaussian) estimate of ``log mean_t exp(s q_i·(k_t − k̄_g))`` from the keys'
per-channel variance ``σ²_g``, clipped to the bound that term can never exceed, ``s |q_i| r_g`` with
``r_g = max_t |k_t − k̄_g|``, so the correction stays bounded at every step and layer.

Methods: ``"pooled-var"`` (one summary per skipped key block) and ``"pooled-var-32"`` (one per 32
consecutive tile-order keys of it: a tighter estimate, four times the terms at 128-token blocks).
Measured on testbed-l (8 held-out cases, 20 steps, default warm-up, H200; README "The tail"): the
mean-key term alone (no variance) lost PSNR to dropping at densities 0.25 and 0.5 (−0.67, −0.39 dB);
with the variance term both methods gained at every density tried.

Cost, per query row and skipped group: three ``D``-dots (mean key, variance, value) against two per
exact key, so about ``1.5 / (density · group)`` of the sparse pass's arithmetic (11.7% at density
0.1 and 128-token groups, 47% with 32-token groups), plus one pass over k and v for the summaries.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``NB`` blocks, ``NS`` summary
groups (``NB * block_size // group``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cluster_plan import ClusterPlan
from .layout import VideoLayout
from .kernels.pooling import group_mean_reference, group_tables

__all__ = ["AUTO", "CLUSTER_TAIL", "auto_tail", "TAIL_METHODS", "TailMethod", "TailSummaries", "check_tail", "kept_blocks",
           "summarize_reference", "tail_logits", "tail_operands"]


@dataclass(frozen=True)
class TailMethod:
    """One way to summarise the skipped blocks.

    Attributes:
        name (str): the ``tail=`` value.
        group (int | None): key tokens per summary (consecutive tile-order slots); ``None``: one
            summary per key block.
        description (str): one line for docs.
    """

    name: str
    group: int | None
    description: str

    def group_size(self, layout: VideoLayout) -> int:
        """Tokens per summary on ``layout`` (its block size, or the method's group where that divides it)."""
        group = self.group or layout.block_size
        if layout.block_size % group:
            raise ValueError(f"Expect tail={self.name!r}'s group of {group} tokens to divide block_size="
                             f"{layout.block_size}; use a block size that is a multiple of {group}")
        return group


TAIL_METHODS: dict[str, TailMethod] = {m.name: m for m in (
    TailMethod("pooled-var", None, "one summary per skipped key block: mean key + log n + clipped key "
                                   "variance in the logit, mean value"),
    TailMethod("pooled-var-32", 32, "as pooled-var, one summary per 32 consecutive tile-order keys"),
)}


# The cluster tail of a ClusterPlan (sparsevid.cluster_plan): one term per dropped key cluster, logit
# ``scale q.k_mean + log n``, value ``v_mean``; the plan carries its sizes and mean keys, v gives the mean values.
CLUSTER_TAIL = TailMethod("centroid", None, "ClusterPlan only: one term per dropped key cluster: its mean key + "
                                            "log size in the logit, its mean value")
AUTO = "auto"  # the plan type's default tail: None for a BlockPlan or TokenPlan, "centroid" for a ClusterPlan


def check_tail(tail, plan=None) -> TailMethod | str | None:
    """Validate a ``tail=`` value: ``None`` (drop what the plan skips), ``"auto"`` (the plan type's default),
    ``"centroid"`` (a ``ClusterPlan``'s cluster tail) or a name in :data:`TAIL_METHODS` (summaries of a
    ``BlockPlan``'s skipped tiles). With ``plan``, ``"auto"`` is resolved and a tail the plan type does not
    take is refused; without it, ``"auto"`` is returned as is."""
    if tail is None or isinstance(tail, TailMethod):
        method = tail
    elif isinstance(tail, str) and tail == AUTO:
        if plan is None:
            return AUTO
        method = auto_tail(type(plan))
    elif isinstance(tail, str) and tail == CLUSTER_TAIL.name:
        method = CLUSTER_TAIL
    elif isinstance(tail, str) and tail in TAIL_METHODS:
        method = TAIL_METHODS[tail]
    else:
        names = ", ".join(repr(n) for n in (AUTO, CLUSTER_TAIL.name, *TAIL_METHODS))
        raise ValueError(f"Expect tail in (None, {names}) but got {tail!r}")
    if plan is not None and method is not None:
        if method is CLUSTER_TAIL and not isinstance(plan, ClusterPlan):
            raise ValueError(f"Expect a ClusterPlan with tail='centroid' (one term per dropped key cluster) but got a "
                             f"{type(plan).__name__}; use tail=None, 'auto' or one of {', '.join(TAIL_METHODS)}")
        if method is not CLUSTER_TAIL and isinstance(plan, ClusterPlan):
            raise ValueError(f"Expect tail in (None, 'auto', 'centroid') with a ClusterPlan but got tail={method.name!r} "
                             "(summaries of a BlockPlan's skipped tiles); use tail='centroid' (its default)")
    return method


def auto_tail(plan_type: type | None) -> TailMethod | None:
    """What ``tail="auto"`` means for plans of ``plan_type``: the cluster tail for a ``ClusterPlan``, else none."""
    return CLUSTER_TAIL if plan_type is not None and issubclass(plan_type, ClusterPlan) else None


@dataclass(frozen=True)
class TailSummaries:
    """The summary terms of one call's k and v (see the module docstring for their meaning).

    Attributes:
        keys (Tensor): ``(B, H, NS, D)`` mean key of each group.
        values (Tensor): ``(B, H, NS, D)`` mean value of each group.
        log_count (Tensor): float32 ``(NS,)``: ``log n_g`` (``-inf`` for empty groups of a short last block).
        key_var (Tensor): float32 ``(B, H, NS, D)`` per-channel key variance.
        key_radius (Tensor): float32 ``(B, H, NS)`` ``max_t |k_t − k̄_g|``.
        per_block (int): groups per key block (``block_size // group``): group ``j`` lies in block ``j // per_block``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    log_count: torch.Tensor
    key_var: torch.Tensor
    key_radius: torch.Tensor
    per_block: int


def summarize_reference(k: torch.Tensor, v: torch.Tensor, layout: VideoLayout, method: TailMethod) -> TailSummaries:
    """The summaries of ``k``, ``v`` ``(B, H, L, D)`` over ``layout``'s groups, float32: the PyTorch twin of
    :func:`sparsevid.kernels.triton_tail.summarize_triton` (differentiable: the reference backend trains with it)."""
    group = method.group_size(layout)
    group_of_token, group_tokens = group_tables(layout, group, k.device)
    keys = group_mean_reference(k, group_of_token, group_tokens)
    values = group_mean_reference(v, group_of_token, group_tokens)
    centred = k.float() - keys[:, :, group_of_token]
    key_var = group_mean_reference(centred.square(), group_of_token, group_tokens)
    distance = centred.norm(dim=-1)  # (B, H, L)
    key_radius = distance.new_zeros(*distance.shape[:2], group_tokens.numel()).scatter_reduce_(
        2, group_of_token.expand_as(distance), distance, "amax")
    return TailSummaries(keys, values, group_tokens.float().log(), key_var, key_radius, layout.block_size // group)


def kept_blocks(plan) -> torch.Tensor:
    """bool ``(B or 1, H or 1, NB, NB)``: a ``BlockPlan`` as a block mask (``plan.to_dense()``): the key
    blocks whose groups are computed exactly, not summarised. Built per call and not kept with the plan:
    at Wan 14B 720p it is 14 MB against the plan's 11 MB of lists, and sessions that reuse plans hold every
    layer's (the next step: read the kept blocks from the CSR row inside the tail kernels)."""
    return plan.to_dense()


def tail_operands(summarize, k: torch.Tensor, v: torch.Tensor, plan, method: TailMethod
                  ) -> tuple[TailSummaries, torch.Tensor]:
    """What a tail pass reads: the summaries of ``k``, ``v`` built by ``summarize`` (the backend's declared
    builder, see ``sparsevid.register_backend``) and the plan's keep mask expanded to k's batch and heads (a
    stride-0 view where the plan broadcasts)."""
    B, H = k.shape[:2]
    return summarize(k, v, plan.layout, method), kept_blocks(plan).expand(B, H, -1, -1)


def tail_logits(q: torch.Tensor, summaries: TailSummaries, scale: float) -> torch.Tensor:
    """The logits ``z`` of query rows ``q`` (float ``(B, H, *, M, D)``) against every summary group ->
    float32 ``(B, H, *, M, NS)`` (before the kept groups are masked out): the reference definition."""
    q = q.float()
    extra = q.dim() - 4  # dims between heads and rows (the reference's chunk of query blocks)
    expand = (slice(None), slice(None)) + (None,) * extra

    def against(x):  # (B, H, NS, ...) -> broadcast over the extra dims
        return x.float()[expand]

    z = torch.matmul(q, against(summaries.keys).transpose(-1, -2)) * scale + summaries.log_count.float()
    gauss = torch.matmul(q.square(), against(summaries.key_var).transpose(-1, -2)) * (0.5 * scale * scale)
    bound = q.norm(dim=-1, keepdim=True) * against(summaries.key_radius).unsqueeze(-2) * scale
    return z + torch.minimum(gauss, bound)
