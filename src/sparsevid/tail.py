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

**The decision** (issue 31): the formula is an estimate, right on one model and wrong on another (the
variance term overshoots where a plan keeps most of the mass). So each call measures it: ``PROBES`` (32)
query rows per (batch, head), a fixed sample strided over the tile order, get their exact attention
over all keys (computed densely: ``32 / (density · L)`` of the sparse pass's arithmetic, 1% at density
0.1 and Wan 1.3B 480p's L = 32760; one more read of k and v), their partial over the kept
keys, and the partial over their summary terms with and without the variance correction; per (batch,
head) the call then takes the option whose merge (flash-decoding's combine, the summaries' log-sum-exp
shifted by ``log w``, ``w`` in :data:`TAIL_WEIGHTS`) is nearest the exact rows, dropping included and
winning ties (:func:`choose_tail`, shared with any other tail). The result is a device tensor, the
*gate* ``(log w, c)`` of each (batch, head) (:func:`decide_tail`), that adds ``c · correction + log w``
to the summary logits in every backend: no host sync, and the kernels never decide. ``method.fixed()``
takes the summaries as they are (the formula's tests, the tail's cost). A ``ClusterPlan``'s cluster tail
(``"centroid"``, one term per dropped key cluster) is decided the same way with one candidate, its centroid terms
(:func:`decide_cluster_tail`: a gate ``log w`` per (batch, head)).

Cost, per query row and skipped group: three ``D``-dots (mean key, variance, value) against two per
exact key, so about ``1.5 / (density · group)`` of the sparse pass's arithmetic (11.7% at density
0.1 and 128-token groups, 47% with 32-token groups), plus one pass over k and v for the summaries.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``NB`` blocks, ``NS`` summary
groups (``NB * block_size // group``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .cluster_plan import ClusterPlan, cluster_means
from .layout import VideoLayout
from .kernels.pooling import group_mean_reference, group_tables

__all__ = ["AUTO", "CLUSTER_TAIL", "LOG_WEIGHT_STEP", "PROBES", "TAIL_METHODS", "TAIL_WEIGHTS", "TailMethod",
           "TailSummaries", "auto_tail", "check_probe_tables", "check_tail", "choose_tail", "cluster_tail_partials",
           "decide_cluster_tail", "decide_tail", "fixed_gate", "kept_blocks", "option_errors", "probe_partials",
           "probe_partials_reference", "probe_rows", "summarize_reference", "tail_logits", "tail_operands"]

PROBES = 32  # exact query rows per (batch, head) that measure the tail in each call (tens: their cost is rows x L)
TAIL_WEIGHTS = tuple(2.0 ** (-k / 2) for k in range(9))  # the weights w a summary may take: 1, 1/√2, ..., 1/16
LOG_WEIGHT_STEP = -0.5 * math.log(2.0)  # log TAIL_WEIGHTS[k] = k * LOG_WEIGHT_STEP
_KEY_CHUNK = 4096  # keys upcast to float32 at a time for the probe rows (never a float32 copy of k or v)


@dataclass(frozen=True)
class TailMethod:
    """One way to summarise the skipped blocks.

    Attributes:
        name (str): the ``tail=`` value.
        group (int | None): key tokens per summary (consecutive tile-order slots); ``None``: one
            summary per key block.
        description (str): one line for docs.
        probes (int): exact query rows per (batch, head) from which each call decides how much of the tail
            it takes (:func:`decide_tail`); ``0``: the summaries as they are (:meth:`fixed`).
    """

    name: str
    group: int | None
    description: str
    probes: int = PROBES

    def fixed(self) -> "TailMethod":
        """The same summaries taken as they are, with no decision: what the tail costs and what its formula
        gives (benchmarks, the formula's tests)."""
        return replace(self, probes=0)

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
# ``scale q.k_mean + log n``, value ``v_mean``; the plan carries the sizes, this call's k and v the means.
# Each call decides, per (batch, head), how much of it to take (decide_cluster_tail); fixed(): the terms as they are.
CLUSTER_TAIL = TailMethod("centroid", None, "ClusterPlan only: one term per dropped key cluster: its mean key + "
                                            "log size in the logit, its mean value, weighted per head by the "
                                            "call's probe rows")
AUTO = "auto"  # the plan type's default tail: None for a BlockPlan or TokenPlan, "centroid" for a ClusterPlan


def check_tail(tail, plan=None) -> TailMethod | str | None:
    """Validate a ``tail=`` value: ``None`` (drop what the plan skips), ``"auto"`` (the plan type's default),
    ``"centroid"`` (a ``ClusterPlan``'s cluster tail) or a name in :data:`TAIL_METHODS` (summaries of a
    ``BlockPlan``'s skipped tiles). With ``plan``, ``"auto"`` is resolved and a tail the plan type does not
    take is refused; without it, ``"auto"`` is returned as is."""
    if tail is None:
        method = None
    elif isinstance(tail, TailMethod):
        if isinstance(tail.probes, bool) or not isinstance(tail.probes, int) or tail.probes < 0:
            raise ValueError(f"Expect tail.probes as an int >= 0 but got {tail.probes!r}")
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
        if method.name == CLUSTER_TAIL.name and not isinstance(plan, ClusterPlan):
            raise ValueError(f"Expect a ClusterPlan with tail='centroid' (one term per dropped key cluster) but got a "
                             f"{type(plan).__name__}; use tail=None, 'auto' or one of {', '.join(TAIL_METHODS)}")
        if method.name != CLUSTER_TAIL.name and isinstance(plan, ClusterPlan):
            raise ValueError(f"Expect tail in (None, 'auto', 'centroid') with a ClusterPlan but got tail={method.name!r} "
                             "(summaries of a BlockPlan's skipped tiles); use tail='centroid' (its default)")
    return method


def auto_tail(plan_type: type | None) -> TailMethod | None:
    """What ``tail="auto"`` means for plans of ``plan_type``: the cluster tail (decided per call) for a
    ``ClusterPlan``, else none."""
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


def tail_operands(summarize, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, method: TailMethod,
                  scale: float, offset: int = 0) -> tuple[TailSummaries, torch.Tensor, torch.Tensor]:
    """What a tail pass reads: the summaries of ``k``, ``v`` built by ``summarize`` (the backend's declared
    builder, see ``sparsevid.register_backend``), the plan's keep mask expanded to k's batch and heads (a
    stride-0 view where the plan broadcasts), and the call's decision on the summaries (:func:`decide_tail`
    from probe rows of ``q``, tokens ``[offset, offset + M)``: a ring rank's chunk decides from its own rows),
    made here once, right after the summaries, for every backend and the ring."""
    B, H = k.shape[:2]
    summaries, kept = summarize(k, v, plan.layout, method), kept_blocks(plan)
    gate = decide_tail(q, k, v, plan.layout, kept, summaries, scale, method.probes, offset)
    return summaries, kept.expand(B, H, -1, -1), gate


def _summary_logits(q: torch.Tensor, summaries: TailSummaries, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, correction)``, float32 ``(B, H, *, M, NS)``: the mean-key part of the logits of query rows
    ``q`` (float ``(B, H, *, M, D)``) against every summary group, ``s q·k̄ + log n``, and the clipped
    variance correction ``min(½ s² (q∘q)·σ², s |q| r)``."""
    q = q.float()
    extra = q.dim() - 4  # dims between heads and rows (the reference's chunk of query blocks)
    expand = (slice(None), slice(None)) + (None,) * extra

    def against(x):  # (B, H, NS, ...) -> broadcast over the extra dims
        return x.float()[expand]

    mean = torch.matmul(q, against(summaries.keys).transpose(-1, -2)) * scale + summaries.log_count.float()
    gauss = torch.matmul(q.square(), against(summaries.key_var).transpose(-1, -2)) * (0.5 * scale * scale)
    bound = q.norm(dim=-1, keepdim=True) * against(summaries.key_radius).unsqueeze(-2) * scale
    return mean, torch.minimum(gauss, bound)


def tail_logits(q: torch.Tensor, summaries: TailSummaries, scale: float,
                gate: torch.Tensor | None = None) -> torch.Tensor:
    """The logits ``z`` of query rows ``q`` (float ``(B, H, *, M, D)``) against every summary group ->
    float32 ``(B, H, *, M, NS)`` (before the kept groups are masked out): the reference definition.
    ``gate``: each (batch, head)'s decision (:func:`decide_tail`): ``z = mean + c · correction + log w``;
    ``None``: ``c = 1``, ``w = 1``."""
    mean, correction = _summary_logits(q, summaries, scale)
    if gate is None:
        return mean + correction
    per_head = gate.float()[(slice(None), slice(None)) + (None,) * (q.dim() - 2)]  # (B, H, 1.., 2)
    return mean + correction * per_head[..., 1] + per_head[..., 0]


# --------------------------------------------------------------------------------------- the decision
def fixed_gate(batch: int, heads: int, device) -> torch.Tensor:
    """The decision that takes the summaries as they are: float32 ``(B, H, 2)`` of ``(log w, c) = (0, 1)``
    (built by device kernels, no host copy: CUDA-graph capturable)."""
    gate = torch.zeros(batch, heads, 2, device=device)
    gate[..., 1] = 1.0
    return gate


def probe_rows(layout: VideoLayout, probes: int, device, lo: int = 0, hi: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, blocks)``, int64 ``(P,)``: a fixed sample of ``P = min(probes, hi - lo)`` of the tokens
    ``[lo, hi)`` (default: all), evenly strided over the tile order (so over the query blocks and their plan
    rows), as indices from ``lo``, and the query block of each. Built once per layout, sample and device."""
    hi = layout.num_tokens if hi is None else hi
    key = (str(torch.device(device)), "probes", probes, lo, hi)
    tables = layout._device_tables.get(key)
    return tables if tables is not None else _build_probe_rows(layout, key)


@torch.compiler.disable  # eager, like the layout's tables: cached constants with integer divisions
@torch.inference_mode(False)
def _build_probe_rows(layout: VideoLayout, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    device, _, probes, lo, hi = key
    slots = torch.arange(layout.num_tokens)
    tokens = layout.perm[: layout.num_tokens]  # tile order has no padding before the last block
    inside = (tokens >= lo) & (tokens < hi)
    tokens, slots = tokens[inside], slots[inside]
    n = tokens.numel()
    count = min(probes, n)
    pick = (torch.arange(count) * 2 + 1) * n // (2 * count)  # the middle of each of count equal strides
    layout._device_tables[key] = ((tokens[pick] - lo).to(device), (slots[pick] // layout.block_size).to(device))
    return layout._device_tables[key]


def _partial(scores: torch.Tensor, values) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax partial over the last dim of ``scores`` (float32, ``-inf`` = not in the partial): ``(out, lse)``,
    a row with no entry zero with ``-inf``. ``values(probs)`` multiplies the probabilities with the values."""
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
    return values(probs), lse


def probe_partials(qp: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept_groups: torch.Tensor,
                   key_groups: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(exact, kept_out, kept_lse)`` of probe rows ``qp`` (float32 ``(B, H, P, D)``): their exact attention over
    every key of ``k``, ``v`` ``(B, H, L, D)`` and their partial over the keys they keep, float32. What a row keeps
    is two tables, never a ``(P, L)`` mask: row ``p`` keeps key ``n`` where ``key_groups[n] < 0`` or
    ``kept_groups[p, key_groups[n]]`` (bool ``(B', H', P, G)``; integer ``(B', H', L)`` in ``[-1, G)``; each
    broadcasting to q's batch and heads): key blocks of a tile plan, key clusters of a clustered plan. On CUDA
    one Triton pass (:mod:`sparsevid.kernels.triton_probe`: the float32 matmuls of the PyTorch twin run on CUDA
    cores there, 1.5 ms a call at Wan2.1-1.3B 480p); elsewhere, or for a head dim or dtype the kernel does not
    take, :func:`probe_partials_reference`."""
    if qp.is_cuda:
        from .kernels import triton_probe

        if triton_probe.takes(qp.shape[-1], k.dtype):
            return triton_probe.probe_partials_triton(qp.to(k.dtype), k, v, kept_groups, key_groups, scale)
    return probe_partials_reference(qp, k, v, kept_groups, key_groups, scale)


def check_probe_tables(kept_groups: torch.Tensor, key_groups: torch.Tensor, B: int, H: int, P: int,
                       L: int) -> None:
    """The keep tables of ``P`` probe rows over ``L`` keys for ``(B, H)``: ``ValueError`` naming the argument."""
    if (kept_groups.dtype != torch.bool or kept_groups.dim() != 4 or kept_groups.shape[2] != P
            or kept_groups.shape[0] not in (1, B) or kept_groups.shape[1] not in (1, H)):
        raise ValueError(f"Expect kept_groups as a bool (B' in (1, {B}), H' in (1, {H}), {P}, G) tensor but got "
                         f"{kept_groups.dtype} {tuple(kept_groups.shape)}")
    if (key_groups.dtype not in (torch.int32, torch.int64) or key_groups.dim() != 3 or key_groups.shape[2] != L
            or key_groups.shape[0] not in (1, B) or key_groups.shape[1] not in (1, H)):
        raise ValueError(f"Expect key_groups as an int32 / int64 (B' in (1, {B}), H' in (1, {H}), {L}) tensor but got "
                         f"{key_groups.dtype} {tuple(key_groups.shape)}")


def probe_partials_reference(qp: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept_groups: torch.Tensor,
                             key_groups: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`probe_partials` in PyTorch (the CPU path and the Triton kernel's twin): keys upcast to float32 a
    chunk at a time; a row that keeps no key gets a zero output and ``-inf``."""
    B, H, P, _ = qp.shape
    L = k.shape[2]
    check_probe_tables(kept_groups, key_groups, B, H, P, L)
    groups = key_groups.long()
    bh = (max(groups.shape[0], kept_groups.shape[0]), max(groups.shape[1], kept_groups.shape[1]))
    index = groups.clamp(min=0).unsqueeze(-2).expand(*bh, P, L)
    kept_keys = kept_groups.expand(*bh, P, -1).gather(-1, index) | (groups < 0).unsqueeze(-2)  # (B', H', P, L)
    chunks = range(0, L, _KEY_CHUNK)
    scores = torch.cat([torch.matmul(qp, k[:, :, i:i + _KEY_CHUNK].float().transpose(-1, -2)) for i in chunks], -1)
    scores = torch.stack([scores, scores.masked_fill(~kept_keys, float("-inf"))]) * scale  # (2, B, H, P, L)
    (exact, kept_out), (_, kept_lse) = _partial(scores, lambda p: sum(
        torch.matmul(p[..., i:i + _KEY_CHUNK], v[:, :, i:i + _KEY_CHUNK].float()) for i in chunks))
    return exact, kept_out, kept_lse


def choose_tail(exact: torch.Tensor, kept_out: torch.Tensor, kept_lse: torch.Tensor, tail_out: torch.Tensor,
                tail_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of a tail each (batch, head) takes, from probe rows whose exact attention is known: the
    decision every tail shares (tile summaries, cluster centroids).

    Each option merges the kept-only partial with a tail candidate's partial, that partial's log-sum-exp
    shifted by ``log w`` (flash-decoding's combine, :func:`sparsevid.kernels.reference.merge_partials`), and is
    scored by its squared error to the exact rows, summed over the probe rows; dropping (``w = 0``, the kept
    partial alone) is an option and wins ties, so the chosen option is never worse than dropping on the probe rows.
    The weights tried for each candidate are :data:`TAIL_WEIGHTS`.

    Args:
        exact (Tensor): float32 ``(B, H, P, D)``: the probe rows' exact attention output (all keys).
        kept_out, kept_lse (Tensor): float32 ``(B, H, P, D)``, ``(B, H, P)``: their partial over the kept keys.
        tail_out, tail_lse (Tensor): float32 ``(C, B, H, P, D)``, ``(C, B, H, P)``: their partial over the tail
            terms of each of ``C`` candidates (e.g. mean summaries, variance-corrected ones).

    Returns:
        ``(choice, log_weight)``: int64 ``(B, H)``, the chosen candidate (``-1``: drop), and float32 ``(B, H)``,
        ``log w`` (``-inf``: drop).
    """
    errors = option_errors(exact, kept_out, kept_lse, tail_out, tail_lse)
    weights = len(TAIL_WEIGHTS)
    best = errors.argmin(dim=0)  # the first minimum: dropping wins ties
    option = (best - 1).clamp(min=0)
    choice = torch.where(best == 0, -1, option // weights)
    log_weight = torch.where(best == 0, float("-inf"), _log_weights(exact.device)[option % weights])
    return choice, log_weight


def option_errors(exact: torch.Tensor, kept_out: torch.Tensor, kept_lse: torch.Tensor, tail_out: torch.Tensor,
                  tail_lse: torch.Tensor) -> torch.Tensor:
    """float32 ``(1 + C * W, B, H)``: the squared error to ``exact`` summed over the probe rows of each option of
    :func:`choose_tail` (arguments as there): dropping first, then candidate ``c`` with weight ``w`` at ``1 + c * W
    + w``, ``W = len(TAIL_WEIGHTS)``."""
    from .kernels.reference import merge_partials  # here: kernels.reference imports this module

    shift = _log_weights(exact.device)[:, None, None, None, None]  # (W, 1, 1, 1, 1) against (1, C, B, H, P)
    merged, _ = merge_partials(kept_out, kept_lse, tail_out.unsqueeze(0), tail_lse.unsqueeze(0) + shift)
    errors = (merged - exact).square().sum(dim=(-1, -2)).transpose(0, 1).flatten(0, 1)  # (C * W, B, H)
    drop = (kept_out - exact).square().sum(dim=(-1, -2))
    return torch.cat([drop.unsqueeze(0), errors])


def _log_weights(device) -> torch.Tensor:
    """float32 ``(W,)``: ``log w`` of :data:`TAIL_WEIGHTS`, ``-k/2 log 2``, made on the device (no host copy:
    CUDA-graph capturable)."""
    return torch.arange(len(TAIL_WEIGHTS), dtype=torch.float32, device=device) * LOG_WEIGHT_STEP


@torch.no_grad()  # a discrete choice: no gradient flows through it
def decide_tail(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout, kept: torch.Tensor,
                summaries: TailSummaries, scale: float, probes: int = PROBES, offset: int = 0) -> torch.Tensor:
    """The call's decision on its summaries, per (batch, head), from ``probes`` exact query rows
    (:func:`probe_rows`): drop them, take the mean summaries or the variance-corrected ones, with a weight
    ``w`` (:func:`choose_tail`). A device tensor, no host sync; the kernels read it and never decide.

    Args:
        q (Tensor): ``(B, H, M, D)``: the query rows at hand, tokens ``[offset, offset + M)`` of the layout
            (all of them, or a ring rank's chunk).
        k, v (Tensor): ``(B, H, L, D)``: every key and value.
        layout (VideoLayout): the layout of the ``L`` tokens.
        kept (Tensor): bool ``(B or 1, H or 1, NB, NB)``: the plan as a block mask (:func:`kept_blocks`).
        summaries (TailSummaries): the summaries of ``k``, ``v``.
        scale (float): softmax scale.
        probes (int): rows sampled per call; ``0``: :func:`fixed_gate`.
        offset (int): the token of ``q``'s first row.

    Returns:
        Tensor: float32 ``(B, H, 2)``: ``(log w, c)`` of each (batch, head), ``log w = -inf`` to drop the tail,
        ``c`` the weight of the variance correction (0: mean summaries, 1: corrected); :func:`tail_logits`.
    """
    B, H, M, D = q.shape
    if probes == 0:
        return fixed_gate(B, H, q.device)
    rows, blocks = probe_rows(layout, probes, q.device, offset, offset + M)
    kept_rows = kept[:, :, blocks]  # (B', H', P, NB)
    qp = q[:, :, rows].float()
    key_blocks = layout.on(q.device).block_of_token.view(1, 1, -1)
    exact, kept_out, kept_lse = probe_partials(qp, k, v, kept_rows, key_blocks, scale)
    skipped = ~kept_rows.repeat_interleave(summaries.per_block, dim=-1) & (summaries.log_count > float("-inf"))
    mean, correction = _summary_logits(qp, summaries, scale)  # (B, H, P, NS)
    candidates = torch.stack([mean, mean + correction]).masked_fill(~skipped, float("-inf"))
    tail_out, tail_lse = _partial(candidates, lambda p: torch.matmul(p, summaries.values.float()))
    choice, log_weight = choose_tail(exact, kept_out, kept_lse, tail_out, tail_lse)
    return torch.stack([log_weight, choice.clamp(min=0).float()], dim=-1)


@torch.no_grad()  # a discrete choice: no gradient flows through it
def decide_cluster_tail(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ClusterPlan, scale: float,
                        probes: int = PROBES, means: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> torch.Tensor:
    """The call's decision on a ``ClusterPlan``'s cluster tail, per (batch, head): ``log w`` of the weight its
    centroid terms take (``-inf``: drop them), from ``probes`` exact video query rows (:func:`probe_rows`; text
    rows keep every key) and :func:`choose_tail` with one candidate, the centroid terms as the kernels compute
    them. A device tensor, no host sync; the cluster kernels add it to every centroid logit and never decide.

    Args:
        q, k, v (Tensor): ``(B, H, L, D)``.
        plan (ClusterPlan): broadcasts to q's batch and heads.
        scale (float): softmax scale.
        probes (int): rows sampled per call; ``0``: the terms as they are (``log w = 0``).
        means (tuple | None): float32 ``(B, H, Ck, D)`` mean keys and mean values of this call's k and v over the
            plan's key clusters where the backend has built them (its kernel reads the same); ``None``:
            :func:`~sparsevid.cluster_plan.cluster_means`.

    Returns:
        Tensor: float32 ``(B, H)``.
    """
    B, H = q.shape[:2]
    if probes == 0:
        return torch.zeros(B, H, device=q.device)
    lo = plan.video_offset
    rows, _ = probe_rows(plan.layout, probes, q.device, lo, lo + plan.layout.video_tokens)
    rows = rows + lo
    # (B', H', P, Ck): the plan's, built once per plan (a reused plan reads it every call)
    kept_rows = plan.kept_of_rows(rows, name=f"probes {probes} {rows.device}")
    k_means, values = (cluster_means(k, plan), cluster_means(v, plan)) if means is None else means
    if q.is_cuda:
        from .kernels import triton_probe

        if triton_probe.takes(q.shape[-1], k.dtype):  # two launches for the ~60 small kernels below
            return triton_probe.decide_cluster_triton(q[:, :, rows].to(k.dtype), k, v, kept_rows, plan.k_labels(),
                                                      (k_means, values), plan.log_k_sizes, scale)[0]
    partials = cluster_tail_partials(q[:, :, rows].float(), k, v, kept_rows, plan, (k_means, values), scale)
    return choose_tail(*partials)[1]


def cluster_tail_partials(qp: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept_rows: torch.Tensor,
                          plan: ClusterPlan, means: tuple[torch.Tensor, torch.Tensor], scale: float
                          ) -> tuple[torch.Tensor, ...]:
    """What :func:`choose_tail` scores for the cluster tail, in PyTorch (the twin of the CUDA decision,
    :func:`sparsevid.kernels.triton_probe.decide_cluster_triton`): ``(exact, kept_out, kept_lse, tail_out, tail_lse)``
    of the float32 probe rows ``qp`` ``(B, H, P, D)``, whose kept key clusters are ``kept_rows`` ``(B', H', P, Ck)``;
    the tail is one candidate (leading dim 1): the rows' centroid terms over this call's ``means``."""
    k_means, values = means
    exact, kept_out, kept_lse = probe_partials(qp, k, v, kept_rows, plan.k_labels(), scale)
    logits = torch.matmul(qp, k_means.transpose(-1, -2)) * scale + plan.log_k_sizes.unsqueeze(-2)
    logits = logits.masked_fill(kept_rows, float("-inf"))  # (B, H, P, Ck); an empty cluster's log n is -inf
    tail_out, tail_lse = _partial(logits, lambda p: torch.matmul(p, values))
    return exact, kept_out, kept_lse, tail_out.unsqueeze(0), tail_lse.unsqueeze(0)
