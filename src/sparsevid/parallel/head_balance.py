"""Head balance under Ulysses context parallelism: which heads each rank plans and computes.

Ulysses attention (diffusers' ``ContextParallelConfig(ulysses_degree=U)``) gives rank ``u`` the heads
``[u*H/U, (u+1)*H/U)`` of the order the heads arrive in, and the all-to-all after attention waits for
the slowest rank. A plan's cost differs by head where the budget is a mass (``mass=``, xattn's
default) or spans heads: peaked heads keep few blocks, diffuse ones many. Balancing permutes the
heads before the all-to-all (and the output back after it) so that each rank's heads compute about
the same number of score entries.

The costs are the computed entries of each head in the last plan of the same layer and call, one
plan behind (a layer's plans change little from step to step); the first plan of a layer runs in
the model's order. The order is device data: :func:`balanced_order` is a sort and a fixed pattern
(no host read), and a new order takes effect only where the layer replans anyway (``replan_every``).

Balancing never changes the result: each head's plan depends on that head's q and k alone
(:func:`separable`), and a permutation of whole heads moves computations without changing any.

Measured on the CPU over real plans (``scripts/parallel_sim.py``, BENCHMARKS.md): a density budget
spent per head (``draft``'s default) gives every head the same density, so there is nothing to
balance; mass budgets differ by head (testbed-l: 6-9x between heads), and dealing them by the
previous step's costs comes within 0.7% of dealing them by the same step's. The alternative, one
budget per rank (``budget="layer"`` planned by each rank on its heads: equal by construction), is not
the one-GPU plan, so it is not what this module does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["HeadBalance", "balanced_order", "imbalance", "separable"]


def separable(method: str | None, plan_options: dict) -> str | None:
    """``None`` where each head's plan of ``method`` depends on that head's q and k alone (so a head
    plans the same on any rank, in any position); otherwise why not."""
    if method == "random":
        return "random draws its scores by head position"
    if plan_options.get("budget") == "layer":
        return "budget='layer' spends one budget over all heads"
    return None


def _snake(heads: int, ranks: int, device) -> torch.Tensor:
    """int64 ``(H,)``: for the heads sorted by decreasing cost, the sorted positions each rank takes, rank
    after rank: rounds of ``ranks`` positions dealt forwards, then backwards (0, 1, .., U-1, U-1, .., 0, ...).
    Built on ``device``: a host-to-device copy would wait for the stream."""
    position = torch.arange(heads, device=device)
    rounds, within = position // ranks, position % ranks
    rank = torch.where(rounds % 2 == 0, within, ranks - 1 - within)
    return torch.argsort(rank * heads + position)  # rank-major, each rank's positions ascending


def balanced_order(costs: torch.Tensor, ranks: int) -> torch.Tensor:
    """A head order for ``ranks`` Ulysses ranks: int64 ``(H,)``, rank ``u`` takes heads
    ``order[u*H/U:(u+1)*H/U]``. Heads sorted by decreasing ``costs`` (``(H,)``) are dealt to the ranks
    in snake order (each rank gets one of the costliest ``U``, then one of the next ``U`` in reverse, ...),
    on the device of ``costs``."""
    H = costs.shape[0]
    if H % ranks:
        raise ValueError(f"Expect heads divisible by the {ranks} Ulysses ranks but got {H} heads")
    return costs.argsort(descending=True, stable=True)[_snake(H, ranks, costs.device)]


def imbalance(costs: torch.Tensor, order: torch.Tensor | None, ranks: int) -> float:
    """The slowest rank's cost over the mean rank's (1.0 = balanced) when rank ``u`` takes heads
    ``order[u*H/U:(u+1)*H/U]`` (``None``: the model's order)."""
    per_head = costs if order is None else costs[order]
    load = per_head.double().view(ranks, -1).sum(-1)
    return float(load.max() / load.mean())


@dataclass
class _Slot:
    current: torch.Tensor | None = None  # the order in force; None: the model's
    version: int = 0  # part of the plan cache key: a cached plan belongs to one order
    pending: torch.Tensor | None = None  # the order the last plan's costs ask for
    since: int = -1  # the step the order in force took effect
    recorded: torch.Tensor | None = None  # the last new plan's cost per local head, not yet exchanged


class HeadBalance:
    """Per ``(layer, call)``, the head order of the next Ulysses split (see the module docstring).

    The adapter asks :meth:`order` before the all-to-all, the session :meth:`record`\\ s each new
    plan's per-head cost, and the adapter passes every rank's costs (an all-gather over the Ulysses
    group) to :meth:`propose`.
    """

    def __init__(self):
        self._slots: dict[tuple, _Slot] = {}

    def order(self, slot: tuple, step: int, replan_every: int) -> torch.Tensor | None:
        """The order to apply now: the proposed one once the layer replans (its plan is stale at ``step``)."""
        state = self._slots.get(slot)
        if state is None:
            return None
        if state.pending is not None and (step - state.since >= replan_every or state.since > step):
            state.current, state.pending, state.since = state.pending, None, step
            state.version += 1
        return state.current

    def version(self, slot: tuple) -> int:
        state = self._slots.get(slot)
        return 0 if state is None else state.version

    def record(self, slot: tuple, plan, heads: int, step: int) -> None:
        """A new plan of ``slot``'s ``heads`` local heads: its computed entries per head (summed over the
        batch; a plan broadcast over heads costs each head alike)."""
        state = self._slots.setdefault(slot, _Slot())
        if state.since < 0:
            state.since = step
        state.recorded = plan.density_per_head().sum(0).expand(heads)

    def take_recorded(self, slot: tuple) -> torch.Tensor | None:
        """The costs :meth:`record` kept for ``slot`` since the last call (``None``: no new plan)."""
        state = self._slots.get(slot)
        if state is None or state.recorded is None:
            return None
        recorded, state.recorded = state.recorded, None
        return recorded

    def propose(self, slot: tuple, costs: torch.Tensor, applied: torch.Tensor | None, ranks: int) -> None:
        """Every head's cost ``(H,)`` in the order that was applied (``applied``; ``None``: the model's):
        the order to switch to when the layer next replans."""
        if applied is not None:
            costs = torch.empty_like(costs).index_copy_(0, applied, costs)
        self._slots[slot].pending = balanced_order(costs, ranks)

    def reset(self) -> None:
        self._slots.clear()
