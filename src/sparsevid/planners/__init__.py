"""Planners: each turns (q, k, layout, options) into a :class:`~sparsevid.plan.BlockPlan`
(or, for the M x 1 planner ``finegrained``, a :class:`~sparsevid.token_plan.TokenPlan`; for ``clustered``, a
:class:`~sparsevid.cluster_plan.ClusterPlan`).

A planner is a function ``fn(q, k, layout, *, density=None, mass=None, **options) -> BlockPlan``
registered under a name with :func:`register_planner`. :func:`plan` validates the common
arguments once and dispatches; planners never launch attention.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ..cluster_plan import ClusterPlan
from ..layout import VideoLayout
from ..plan import BlockPlan
from ..token_plan import TokenPlan

__all__ = ["PlannerSpec", "TokenCountError", "available_planners", "plan", "planner_spec", "planners_taking",
           "register_planner"]

_BUDGETS = ("density", "mass")


class TokenCountError(ValueError):
    """A planner option that this call's tokens cannot take (e.g. more clusters than video tokens), ``option``
    naming it. Raised at plan; ``sparsevid.apply``'s check on a tiny input leaves the option out instead (the
    model's calls have more tokens), having checked its type and range."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class PlannerSpec:
    """A registered planner and what it declared.

    Attributes:
        name (str): the ``method=`` value.
        fn (Callable): ``fn(q, k, layout, *, density=None, mass=None, **options)``.
        budgets (tuple[str, ...]): the budgets a caller may set (``"density"``, ``"mass"``); ``()``: none
            (``dense``).
        default (tuple[str, float] | None): what the planner spends given neither, e.g. ``("density", 0.1)``;
            ``None``: not declared.
        replan_every (int): how often an integration replans a layer by default (``sparsevid.apply(...,
            replan_every=None)``): 1, or more where reusing a plan across steps was measured to cost no quality.
    """

    name: str
    fn: Callable[..., BlockPlan | TokenPlan]
    budgets: tuple[str, ...]
    default: tuple[str, float] | None
    replan_every: int = 1


_PLANNERS: dict[str, PlannerSpec] = {}
# Import order is registration order, the order of the comparison tables (demo, bench frontier)
_BUILTIN = ("draft", "xattn", "window", "finegrained", "random", "dense", "clustered")


def register_planner(name: str, *, budgets: tuple[str, ...] = ("density",),
                     default: tuple[str, float] | None = None, replan_every: int = 1):
    """Decorator registering a planner under ``name`` (rejects duplicates). A planner whose plans are valid by
    construction (tested) builds them with ``trusted=True``, so ``plan(..., validate=False)`` and
    ``sparse_attention`` never read them on the host; any other plan is validated once, before its first launch.

    Args:
        budgets: which of ``density``/``mass`` the planner takes (``()``: neither, as ``dense``).
        default: what it spends given neither, ``(kind, value)``: stated here once; the planner applies the
            same constant, and integrations report it (``stats()["budget"]``).
        replan_every: the integrations' default replanning interval for this planner (:class:`PlannerSpec`).
    """
    if not set(budgets) <= set(_BUDGETS):
        raise ValueError(f"Expect budgets from {_BUDGETS} but got {budgets!r}")
    if default is not None and (len(default) != 2 or default[0] not in _BUDGETS):
        raise ValueError(f"Expect default as (kind, value) with kind in {_BUDGETS} but got {default!r}")

    def wrap(fn):
        if name in _PLANNERS:
            raise ValueError(f"Expect a new planner name but {name!r} is already registered")
        _PLANNERS[name] = PlannerSpec(name, fn, tuple(budgets), default, replan_every)
        return fn

    return wrap


def available_planners() -> list[str]:
    """Names accepted by ``plan(..., method=...)``, sorted."""
    return sorted(_PLANNERS)


def planner_spec(name: str) -> PlannerSpec:
    """What planner ``name`` declared at registration."""
    if name not in _PLANNERS:
        raise ValueError(f"Expect method in {available_planners()} but got {name!r}")
    return _PLANNERS[name]


def planners_taking(budget: str) -> list[str]:
    """The planners that take ``budget`` (``"density"`` or ``"mass"``), in registration order: the methods a
    density (or mass) sweep compares."""
    return [name for name, spec in _PLANNERS.items() if budget in spec.budgets]


def _check_fraction(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expect {name} to be a float in (0, 1] but got {type(value).__name__}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"Expect {name} in (0, 1] but got {name}={value}")


def plan(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    method: str = "draft",
    *,
    density: float | None = None,
    mass: float | None = None,
    tile: tuple[int, int] | None = None,
    block_size: int | None = None,
    validate: bool = True,
    **options,
) -> BlockPlan | TokenPlan | ClusterPlan:
    """Choose which attention blocks to compute.

    Args:
        q (Tensor): ``(batch, heads, L, head_dim)`` queries, ``L == layout.num_tokens``.
        k (Tensor): ``(batch, heads, L, head_dim)`` keys.
        layout (VideoLayout): token grid of the sequence.
        method (str): a name from :func:`available_planners`.
        density (float, optional): fraction of real score entries to compute, in (0, 1]. The
            achieved ``plan.density`` is within one key block per query block of it, or above it
            where the forced blocks (own block, text) alone exceed it.
        mass (float, optional): alternatively, the attention probability mass to keep, in (0, 1]
            (planners with a probability estimate: ``draft``, ``xattn``, ``clustered``).
        tile (tuple, optional), block_size (int, optional): override the layout's tiling (a
            ``block_size`` without ``tile`` picks the tile with :func:`auto_tile`).
        validate (bool): check that q and k are finite and the plan's invariants (``plan.validate()``;
            host syncs). Built-in planners are valid by construction (tested, ``trusted=True``); hot loops
            pass False (then NaN in q or k propagates to the output as in SDPA, with some plan).
        **options: planner-specific options (see each planner's docstring).

    Returns:
        BlockPlan on q's device (TokenPlan for ``method="finegrained"``, ClusterPlan for ``"clustered"``).

    Raises:
        TypeError / ValueError naming the argument: bad shapes, dtypes, devices, ``L`` that does not
        match the layout, densities out of range, unknown methods, non-finite q/k (content planners).
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"Expect layout to be a sparsevid.VideoLayout but got {type(layout).__name__}")
    if not isinstance(method, str) or method not in _PLANNERS:
        raise ValueError(f"Expect method in {available_planners()} but got {method!r}")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Expect {name} to be a torch.Tensor but got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"Expect {name} of shape (B, heads, L, D) (4-D) but got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"Expect {name} to be a floating-point tensor but got {t.dtype}")
        if 0 in (t.shape[0], t.shape[1], t.shape[3]):
            raise ValueError(f"Expect batch, heads and head_dim >= 1 but got {name} of shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"Expect q and k of one shape but got q={tuple(q.shape)}, k={tuple(k.shape)}")
    if q.device != k.device:
        raise ValueError(f"Expect q and k on one device but got q={q.device}, k={k.device}")
    if q.dtype != k.dtype:
        raise TypeError(f"Expect q and k of one dtype but got q={q.dtype}, k={k.dtype}")
    if tile is not None or block_size is not None:
        # a new block_size alone re-tiles (auto_tile): the old tile may not fit it
        layout = layout.replace(tile=tile if tile is not None else (layout.tile if block_size is None else None),
                                block_size=block_size if block_size is not None else layout.block_size)
    if q.shape[2] != layout.num_tokens:
        raise ValueError(
            f"Expect L={layout.num_tokens} tokens for {layout} but got q.shape[2]={q.shape[2]}; "
            "the layout's frames x height x width (+ text_tokens) must equal the sequence length"
        )
    _check_fraction("density", density)
    _check_fraction("mass", mass)
    if density is not None and mass is not None:
        raise ValueError("Expect one of density or mass but got both")
    check_options(method, options)
    with torch.no_grad():  # choosing blocks is not differentiable: no autograd graph, no saved tensors
        if validate and not bool(torch.isfinite(q).all() & torch.isfinite(k).all()):
            raise ValueError("Expect finite q and k but got NaN/Inf entries; planners rank blocks by q.k")
        result = _PLANNERS[method].fn(q, k, layout, density=density, mass=mass, **options)
        return result.validate() if validate else result


_ACCEPTED: dict[str, list[str] | None] = {}  # planner -> its option names (None: any), read once


def check_options(method: str, options: dict) -> None:
    """Reject planner options that ``method`` does not take, naming them and the ones it does."""
    if method not in _ACCEPTED:
        params = inspect.signature(_PLANNERS[method].fn).parameters
        _ACCEPTED[method] = None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else [
            name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
            and name not in ("density", "mass")]
    accepted = _ACCEPTED[method]
    if accepted is None:
        return
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"Expect options of planner {method!r} in {accepted} (plus density/mass, tile, block_size) "
                        f"but got {', '.join(unknown)}")


for _name in _BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")
