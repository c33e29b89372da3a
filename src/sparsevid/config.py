"""The settings of sparse attention on a model: one object, :class:`SparseVidConfig`, and one check,
:meth:`SparseVidConfig.validate`, composed of the owners' checks.

Every front end builds the same object and validates it once, before any model is hooked, built,
timed or generated: ``sparsevid.apply`` (diffusers), the ComfyUI node, ``eval`` and the bench
commands. Each part of the check belongs to the module that owns the setting:

- the planner (name, budget, options): :mod:`sparsevid.planners`, by one planner run on a tiny CPU
  input (a misspelled option or a value the planner refuses is reported now); the planners'
  default budgets are declared at their registration (:func:`sparsevid.planners.register_planner`);
- the tail: :mod:`sparsevid.tail` and the plan type it needs;
- the backend and 8-bit mode: what the registered backends declare (:func:`_check_backend`);
- ring attention: what the ring runs (:func:`_check_ring`);
- the model: ``dense_layers`` must leave a layer sparse.

Presets (named points of the measured quality-vs-speed frontier) are :data:`NAMED_SETTINGS`, read by
:meth:`SparseVidConfig.named` (``sparsevid.apply(pipe, preset="balanced")``). A preset is not a field
of the config: it resolves to the fields it sets, so every check and report sees the values.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

import torch

__all__ = ["DEFAULT_DENSE_STEP_FRACTION", "NAMED_SETTINGS", "SparseVidConfig"]

DEFAULT_DENSE_STEP_FRACTION = 0.2  # dense_steps=None: this fraction of a generation's steps (DraftAttention/SVG)
_TILING = ("tile", "block_size")  # planner options that shape the VideoLayout, built once per grid

# preset name -> the SparseVidConfig fields it sets (SparseVidConfig.named). Each is a point of the measured
# frontier (transformer forward speedup over native at Wan2.1-1.3B 480p, random weights; PSNR vs dense on
# testbed-l, 8 held-out cases, 20 steps); re-chosen when the frontier moves. No "quality" preset yet: the
# clustered layout's best quality (29.7 dB at 0.1 with its tail) runs 0.99x native on the H100, off the frontier.
NAMED_SETTINGS: dict[str, dict] = {
    # = sparsevid.apply(pipe) with no options (draft's declared default density is 0.1).
    # 1.92x native (H200, fa4, `bench e2e`, 2026-12-02); 1.73x, 22.62 dB (H100, triton, `bench pareto`, 2026-12-07)
    "fast": dict(method="draft", density=0.1),
    # 1.46x native, 28.27 dB (H100, triton, `bench pareto`, 2026-12-07)
    "balanced": dict(method="draft", density=0.25),
}


@dataclass(frozen=True)
class SparseVidConfig:
    """What an integration was asked for (checked by :meth:`validate`).

    Attributes:
        method (str | None): planner name (``sparsevid.available_planners()``); ``None``: native attention.
        density (float | None): fraction of real score entries to compute (``None``: the planner's default,
            declared at its registration).
        mass (float | None): alternatively, attention mass to keep (planners with a probability estimate).
        dense_steps (int | float | None): leading denoising steps run dense: an int count, or a
            fraction of the generation's steps. ``None``: 20% (the DraftAttention/SVG practice). The
            steps are read when each generation starts: from the pipeline's scheduler, or, for a bare
            transformer, from the ``cache_context`` diffusers pipelines call it in; where neither tells
            them, ``None`` means 0 (with a warning) and a fraction raises. A value covering every
            step of a generation warns at its first step.
        dense_layers (int): leading self-attention layers run dense (default 1); must leave one sparse.
        replan_every (int | None): recompute each layer's plan every this many steps, reuse in between;
            ``None``: the planner's default (:attr:`replan_interval`: 1, clustered 4).
        backend (str): ``sparse_attention`` backend (``"auto"``: the fastest that supports the inputs).
        planner_options (dict): extra keyword arguments for the planner (``tile``, ``budget``, ...).
        tile_order (bool | None): keep the video tokens in tile order from the patch embedding to the
            output projection, so attention calls gather nothing (models whose registry entry allows
            it, see :class:`sparsevid.integrations.models.TileOrderPoints`). ``None``: wherever the model allows it.
        quant (str | None): 8-bit attention for the calls sparsevid computes (``"int8"``, ``"fp8"``;
            see ``sparse_attention``). Dense layers and steps keep the user's own attention backend;
            with ``method="dense"`` the layers past ``dense_layers``/``dense_steps`` run the full plan
            through the quantized kernel (``dense_layers=0, dense_steps=0`` quantizes every layer).
        tail (str | None): what the keys a plan skips contribute (see ``sparse_attention`` and
            :mod:`sparsevid.tail`): ``"auto"`` (default) the plan type's default (``None`` for block and
            token plans, the cluster tail ``"centroid"`` for ``clustered``); ``None`` drops them;
            ``"pooled-var"`` keeps a block plan's skipped blocks as summary terms.
        head_balance (bool): under Ulysses context parallelism, deal the heads to the ranks so that each
            computes about the same score entries (:mod:`sparsevid.parallel.head_balance`); the result is the
            same either way. No effect without Ulysses.
    """

    method: str | None = "draft"
    density: float | None = None
    mass: float | None = None
    dense_steps: int | float | None = None
    dense_layers: int = 1
    replan_every: int | None = None
    backend: str = "auto"
    planner_options: dict = field(default_factory=dict)
    tile_order: bool | None = None
    quant: str | None = None
    tail: str | None = "auto"
    head_balance: bool = False

    @classmethod
    def named(cls, name: str | None, **settings) -> SparseVidConfig:
        """The preset ``name`` (:data:`NAMED_SETTINGS`): the fields it sets, ``settings`` for the others
        (``name=None``: no preset, ``settings`` alone; what the front ends' ``preset=None`` means).

        A field the preset sets may appear in ``settings`` only at its default (what a front end passes
        when the user left it alone); any other value is refused rather than silently overridden.
        """
        if name is None:
            return cls(**settings)
        if not isinstance(name, str) or name not in NAMED_SETTINGS:
            raise ValueError(f"Expect preset in {sorted(NAMED_SETTINGS)} (or None) but got {name!r}")
        preset = NAMED_SETTINGS[name]
        for f in fields(cls):
            default = f.default if f.default_factory is MISSING else f.default_factory()
            if f.name in preset and f.name in settings and settings[f.name] != default:
                raise ValueError(f"Expect either preset={name!r} or {f.name}={settings[f.name]!r}, not both: the "
                                 f"preset sets {f.name}")
        return cls(**{**settings, **preset})

    def apply_options(self) -> dict:
        """These settings as the keyword arguments of :func:`sparsevid.apply` (planner options among them)."""
        options = dict(vars(self))
        return {**options.pop("planner_options"), **options}

    @property
    def replan_interval(self) -> int:
        """``replan_every``, or where it is ``None`` the planner's default (1 for native attention)."""
        if self.replan_every is not None:
            return self.replan_every
        if self.method is None:
            return 1
        from .planners import planner_spec

        return planner_spec(self.method).replan_every

    @property
    def layout_options(self) -> dict:
        """The planner options that shape the :class:`VideoLayout` (``tile``, ``block_size``)."""
        return {k: v for k, v in self.planner_options.items() if k in _TILING}

    @property
    def plan_options(self) -> dict:
        """The other planner options, passed to the planner on each plan."""
        return {k: v for k, v in self.planner_options.items() if k not in _TILING}

    def validate(self, *, has_schedule: bool = True, device: torch.device | str | None = None,
                 layers: int | None = None, model: str = "model", ring: bool = False,
                 text_tokens: bool = False) -> SparseVidConfig:
        """Check every setting; raise ``ValueError``/``TypeError`` naming the first bad one. Returns ``self``.

        Args:
            has_schedule: whether the target's steps can be read (a fractional ``dense_steps`` needs them).
            device: where the model runs: a named backend (or an 8-bit mode) must be usable there.
            layers: the model's video self-attention layers (``dense_layers`` must leave one sparse);
                ``None``: not known yet.
            model: the model's name, for messages.
            ring: the model runs under ring attention (context parallelism with a ring degree > 1).
            text_tokens: the model's self-attention sequence holds other tokens than the video's.
        """
        self._check_schedule(has_schedule)
        if self.method is None:
            _check_native(self)
        else:
            plan = _check_planner(self)
            _check_tail(self, plan)
            _check_backend(self, plan, device)
            if ring:
                _check_ring(self, plan, text_tokens)
        if layers is not None and self.method is not None and self.dense_layers >= layers:
            raise ValueError(f"Expect dense_layers < {layers} ({model} has {layers} video self-attention layers) but "
                             f"got dense_layers={self.dense_layers}: nothing would run sparse; lower dense_layers")
        return self

    def _check_schedule(self, has_schedule: bool) -> None:
        """The integration's own settings: warm-up, replanning, token order, head balance."""
        for name, low in (("dense_layers", 0), ("replan_every", 1)):
            value = getattr(self, name)
            if name == "replan_every" and value is None:  # the planner's default
                continue
            if not _is_int(value) or value < low:
                raise ValueError(f"Expect {name} to be an int >= {low} but got {value!r}")
        steps = self.dense_steps
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps < 0 or (
                isinstance(steps, float) and (math.isnan(steps) or steps >= 1)
            ):
                raise ValueError(f"Expect dense_steps as an int >= 0 or a fraction in [0, 1) but got {steps!r}")
            if isinstance(steps, float) and not has_schedule:
                raise ValueError(
                    f"Expect dense_steps as an int for this model (no scheduler to take a fraction of, no diffusers "
                    f"cache_context to read one from) but got {steps}; pass the pipeline to sparsevid.apply, or an int"
                )
        if self.tile_order is not None and not isinstance(self.tile_order, bool):
            raise TypeError(f"Expect tile_order to be a bool or None but got {self.tile_order!r}")
        if not isinstance(self.head_balance, bool):
            raise TypeError(f"Expect head_balance to be a bool but got {self.head_balance!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_native(config: SparseVidConfig) -> None:
    """``method=None`` (native attention, reuse only): no setting that shapes sparse attention."""
    from .backends import check_backend_name, check_quant
    from .tail import AUTO, check_tail

    check_backend_name(config.backend)
    check_quant(config.quant)
    tail = check_tail(config.tail)
    if tail not in (None, AUTO):
        raise ValueError(f"Expect a method with tail={tail.name!r} (it completes the plans sparsevid computes) but got "
                         "method=None")
    if config.quant is not None:
        raise ValueError(f"Expect a method with quant={config.quant!r} (it quantizes the attention sparsevid computes) "
                         "but got method=None; pass method='dense' for quantized dense attention")
    if config.density is not None or config.mass is not None or config.planner_options:
        raise ValueError("Expect no density, mass or planner options with method=None (native attention)")


def _check_planner(config: SparseVidConfig):
    """The planner's own checks (name, budget, options), by one run on a tiny CPU input; returns its plan."""
    from .parallel.head_balance import separable
    from .layout import VideoLayout
    from .planners import available_planners
    from .planners import TokenCountError
    from .planners import plan as make_plan

    if config.method not in available_planners():
        raise ValueError(f"Expect method in {available_planners()} (or None: native attention) but got "
                         f"{config.method!r}")
    reason = separable(config.method, config.plan_options) if config.head_balance else None
    if reason is not None:
        raise ValueError(f"Expect a planner whose plan of each head depends on that head alone with head_balance=True "
                         f"but {reason}; use head_balance=False")
    tiling = config.layout_options
    layout = VideoLayout(2, 4, 4, **tiling) if tiling else VideoLayout(2, 4, 4, tile=(4, 4), block_size=16)
    q = torch.randn(1, 1, layout.num_tokens, 16, generator=torch.Generator().manual_seed(0))
    options = config.plan_options
    if "centroids" in options:
        raise ValueError("Expect no centroids in the planner options of sparsevid.apply (the session keeps each layer's "
                         "and CFG branch's last centroids and passes them itself) but got centroids=")
    while True:
        try:
            return make_plan(q, q, layout, config.method, density=config.density, mass=config.mass, **options)
        except TokenCountError as e:  # more than this tiny probe holds, not what the model's calls hold
            options = {k: v for k, v in options.items() if k != e.option}


def _check_tail(config: SparseVidConfig, plan) -> None:
    """The tail method, the plan type and exact attention it needs, and the group size of the model's blocks."""
    from .attention import check_tail_plan
    from .backends import check_quant
    from .layout import VideoLayout
    from .tail import CLUSTER_TAIL, check_tail

    tail = check_tail(config.tail, plan)
    if tail is not None:
        check_tail_plan(tail, plan, check_quant(config.quant))
        if tail.name != CLUSTER_TAIL.name:  # tile summaries: their group must divide the model's block size
            tail.group_size(VideoLayout(2, 4, 4, **config.layout_options))


def _check_backend(config: SparseVidConfig, plan, device) -> None:
    """The backend and 8-bit mode, from what the backends declared at registration (the registry's own
    :func:`~sparsevid.backends.check_settings`): a named backend must take the planner's plans, the tail and the
    model's block size and be usable on ``device`` (the model's); an 8-bit mode needs a backend computing it there."""
    from .backends import check_settings
    from .layout import VideoLayout

    block_size = VideoLayout(2, 4, 4, **config.layout_options).block_size  # what the model's layouts will have
    check_settings(config.backend, device=device, plan_type=type(plan), block_size=block_size, tail=config.tail,
                   quant=config.quant)


def _check_ring(config: SparseVidConfig, plan, text_tokens: bool) -> None:
    """What ring attention runs (:mod:`sparsevid.parallel.ring`): block plans of a video-only sequence, exact attention,
    on a backend with a ring step."""
    from .backends import check_settings
    from .plan import BlockPlan

    if text_tokens:
        raise ValueError("Expect a model without text tokens in its self-attention sequence under ring attention "
                         "(diffusers splits only the video tokens) but this one has them; use Ulysses (ring_degree=1)")
    if config.quant is not None:
        raise ValueError(f"Expect quant=None under ring attention (the 8-bit kernels have no ring step) but got "
                         f"quant={config.quant!r}")
    if not isinstance(plan, BlockPlan):
        raise ValueError(f"Expect a method making block plans under ring attention but {config.method!r} makes a "
                         f"{type(plan).__name__}; use another method or Ulysses (ring_degree=1)")
    try:
        check_settings(config.backend, plan_type=type(plan), tail=config.tail, ring=True)
    except NotImplementedError as exc:  # a setting, not a call: refused like every other setting of apply
        raise ValueError(f"Expect backend 'auto' or one with a ring step under ring attention: {exc}") from None
