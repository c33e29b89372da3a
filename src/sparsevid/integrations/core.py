"""The framework-neutral core of every integration: settings, step schedule, caches, and the
SDPA-shaped entry point.

An adapter (diffusers hooks, a ComfyUI node) owns one :class:`SparseSession` per transformer and
does three things: at the start of each forward it calls :meth:`SparseSession.begin_forward` with
the call's arguments (bound by name, see :func:`sparsevid.models.bind_call`); for each video
self-attention layer it asks :meth:`SparseSession.runs_sparse`; and it routes a sparse layer's
attention call to :meth:`SparseSession.attend` (``scaled_dot_product_attention``'s arguments,
``(B, heads, L, D)`` tensors). Everything else — which step this is, whether the step and layer
run dense, the token layout, planning, plan reuse across steps, text tokens and key-padding
masks, and the counts a handle reports — lives here, so every adapter behaves alike.

No host sync on the sparse path once a generation runs: the step comes from the scheduler's
``step_index`` (a Python int; the timestep value is read once when it is not known yet), plans and
their statistics stay on the device, and key-padding masks are read once per forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..attention import check_tail_plan, sparse_attention
from ..backends import _registry, backend_spec, check_backend_name, check_quant, tail_refusal
from ..layout import VideoLayout
from ..models import ModelSpec
from ..planners import _check_fraction, available_planners, check_options
from ..planners import plan as make_plan
from ..tail import check_tail

__all__ = ["DEFAULT_DENSE_STEP_FRACTION", "SparseSession", "SparseVidConfig", "validate_config"]

DEFAULT_DENSE_STEP_FRACTION = 0.2
_TILING = ("tile", "block_size")  # planner options that shape the VideoLayout, built once per grid


@dataclass(frozen=True)
class SparseVidConfig:
    """What an integration was asked for (validated by :func:`validate_config`).

    Attributes:
        method (str | None): planner name (``sparsevid.available_planners()``); ``None``: native attention.
        density (float | None): fraction of real score entries to compute (``None``: the planner's default).
        mass (float | None): alternatively, attention mass to keep (draft, xattn).
        dense_steps (int | float | None): leading denoising steps run dense: an int count, or a
            fraction of the pipeline's steps. ``None``: 20% for a pipeline (the DraftAttention/SVG
            practice), 0 for a bare transformer (it cannot see the schedule).
        dense_layers (int): leading self-attention layers run dense (default 1).
        replan_every (int): recompute each layer's plan every this many steps, reuse in between.
        backend (str): ``sparse_attention`` backend (``"auto"``: the fastest that supports the inputs).
        planner_options (dict): extra keyword arguments for the planner (``tile``, ``budget``, ...).
        tile_order (bool | None): keep the video tokens in tile order from the patch embedding to the
            output projection, so attention calls gather nothing (models whose registry entry allows
            it, see :class:`sparsevid.models.TileOrderPoints`). ``None``: wherever the model allows it.
        quant (str | None): 8-bit attention for the calls sparsevid computes (``"int8"``, ``"fp8"``;
            see ``sparse_attention``). Dense layers and steps keep the user's own attention backend;
            with ``method="dense"`` the layers past ``dense_layers``/``dense_steps`` run the full plan
            through the quantized kernel (``dense_layers=0, dense_steps=0`` quantizes every layer).
        tail (str | None): what the key blocks a plan skips contribute (see ``sparse_attention`` and
            :mod:`sparsevid.tail`): ``None`` drops them; ``"pooled"`` keeps them as summary terms.
    """

    method: str | None = "draft"
    density: float | None = None
    mass: float | None = None
    dense_steps: int | float | None = None
    dense_layers: int = 1
    replan_every: int = 1
    backend: str = "auto"
    planner_options: dict = field(default_factory=dict)
    tile_order: bool | None = None
    quant: str | None = None
    tail: str | None = None

    @property
    def layout_options(self) -> dict:
        """The planner options that shape the :class:`VideoLayout` (``tile``, ``block_size``)."""
        return {k: v for k, v in self.planner_options.items() if k in _TILING}

    @property
    def plan_options(self) -> dict:
        """The other planner options, passed to the planner on each plan."""
        return {k: v for k, v in self.planner_options.items() if k not in _TILING}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(config: SparseVidConfig, *, has_schedule: bool, device: torch.device | None = None) -> None:
    """Check every setting before anything is hooked; raise ``ValueError``/``TypeError`` naming it.

    The planner runs once on a tiny CPU input with the given options, so a misspelled option or a
    value the planner refuses is reported now, not at the first sparse step of a generation; a named
    backend must take the planner's plan type and be usable on ``device`` (the model's).
    ``has_schedule``: whether the target has a scheduler (a fractional ``dense_steps`` needs one).
    """
    if config.method is not None and config.method not in available_planners():
        raise ValueError(f"Expect method in {available_planners()} (or None: native attention) but got {config.method!r}")
    _check_fraction("density", config.density)
    _check_fraction("mass", config.mass)
    if config.density is not None and config.mass is not None:
        raise ValueError("Expect one of density or mass but got both")
    for name, low in (("dense_layers", 0), ("replan_every", 1)):
        value = getattr(config, name)
        if not _is_int(value) or value < low:
            raise ValueError(f"Expect {name} to be an int >= {low} but got {value!r}")
    steps = config.dense_steps
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps < 0 or (
            isinstance(steps, float) and (math.isnan(steps) or steps >= 1)
        ):
            raise ValueError(f"Expect dense_steps as an int >= 0 or a fraction in [0, 1) but got {steps!r}")
        if isinstance(steps, float) and not has_schedule:
            raise ValueError(
                f"Expect dense_steps as an int for a bare transformer (no scheduler to take a fraction of) but got "
                f"{steps}; pass the pipeline to sparsevid.apply, or an int"
            )
    backend = check_backend_name(config.backend)
    quant = check_quant(config.quant)
    tail = check_tail(config.tail)
    if tail is not None and config.method is None:
        raise ValueError(f"Expect a method with tail={tail.name!r} (it completes the plans sparsevid computes) but got "
                         "method=None")
    if quant is not None and config.method is None:
        raise ValueError(f"Expect a method with quant={quant!r} (it quantizes the attention sparsevid computes) but "
                         "got method=None; pass method='dense' for quantized dense attention")
    if config.tile_order is not None and not isinstance(config.tile_order, bool):
        raise TypeError(f"Expect tile_order to be a bool or None but got {config.tile_order!r}")
    if config.method is None:
        if config.density is not None or config.mass is not None or config.planner_options:
            raise ValueError("Expect no density, mass or planner options with method=None (native attention)")
        return
    tiling, options = config.layout_options, config.plan_options
    check_options(config.method, options)
    layout = VideoLayout(2, 4, 4, **tiling) if tiling else VideoLayout(2, 4, 4, tile=(4, 4), block_size=16)
    q = torch.randn(1, 1, layout.num_tokens, 16, generator=torch.Generator().manual_seed(0))
    plan = make_plan(q, q, layout, config.method, density=config.density, mass=config.mass, **options)
    if quant is not None:
        _check_quant_backend(quant, backend, plan, config.method, device)
    if tail is not None:
        check_tail_plan(tail, plan, quant)
        tail.group_size(VideoLayout(2, 4, 4, **tiling))  # the block size the model's layouts will have
        if backend != "auto" and not backend_spec(backend).tail:
            raise ValueError(tail_refusal(backend, tail))
    if backend != "auto":
        spec = backend_spec(backend)
        if not isinstance(plan, spec.plans):
            raise TypeError(f"Expect a method whose plans backend {backend!r} runs ({', '.join(p.__name__ for p in spec.plans)}) "
                            f"but {config.method!r} makes a {type(plan).__name__}")
        reason = spec.unusable(torch.device(device)) if device is not None else spec.installed()
        if reason is not None:
            raise ValueError(f"Expect backend {backend!r} to be usable but {reason}; use backend='auto'")


def _check_quant_backend(quant: str, backend: str, plan, method: str, device) -> None:
    """A ``quant`` setting must have a backend computing it that takes the planner's plans and runs on
    ``device`` (``auto``: any such backend that auto may pick there)."""
    device = torch.device(device) if device is not None else None
    if backend != "auto":
        spec = backend_spec(backend)
        if spec.quant != quant:
            raise ValueError(f"Expect a backend computing quant={quant!r} (or 'auto') but got backend {backend!r}, "
                             f"which computes {spec.quant or 'exact attention'}")
        return
    fitting = [s for s in _registry().values() if s.quant == quant and isinstance(plan, s.plans)]
    if not fitting:
        raise TypeError(f"Expect a method whose plans a quant={quant!r} backend runs (BlockPlan) but {method!r} "
                        f"makes a {type(plan).__name__}; use quant=None with it")
    if device is None:
        return
    candidates = sorted((s for s in fitting if device.type in s.auto_devices), key=lambda s: -s.priority)
    reasons = [f"{s.name}: {s.unusable(device)}" for s in candidates if s.unusable(device) is not None]
    if len(reasons) == len(candidates):
        raise ValueError(f"Expect a quant={quant!r} backend usable on {device} but "
                         + ("; ".join(reasons) if reasons else f"none runs on {device.type}") + "; use quant=None"
                         + (" or quant='int8'" if quant == "fp8" else ""))


class SparseSession:
    """One transformer's sparse-attention state: schedule, layouts, plans, and counts.

    Args:
        config (SparseVidConfig): validated settings.
        spec (ModelSpec): the model's registry entry (grid, timestep, where other tokens sit).
        scheduler: the pipeline's scheduler, or ``None`` for a bare transformer.
    """

    def __init__(self, config: SparseVidConfig, spec: ModelSpec, scheduler=None):
        self.config = config
        self.spec = spec
        self.scheduler = scheduler
        self.grid: tuple[int, int, int] | None = None
        self.tiled = False  # this forward's video tokens travel in tile order (set by the adapter)
        self.step = -1
        self.call_in_step = 0
        self._last_t: float | None = None
        self._layouts: dict[tuple, VideoLayout] = {}
        self._plans: dict[tuple, tuple[int, object]] = {}  # cache key -> (step planned, plan)
        self._mask_reads: dict[tuple, object] = {}  # what this forward's masks hold, read once each
        self.sparse_calls = 0  # attention calls computed by sparsevid
        self.dense_calls = 0  # attention calls of hooked layers left native (dense layers and steps)
        self.plans_made = 0
        self._density_sum: torch.Tensor | None = None  # on the device: no sync per plan
        # called as ``observe(layer, step, query, key, value, out, scale)`` after each sparse call (measurement
        # harnesses, e.g. eval's per-step error; empty in normal use)
        self.observers: list = []

    # ------------------------------------------------------------------ schedule
    def reset(self) -> None:
        """Forget the step counter and cached plans (a pipeline call ended); counts survive."""
        self.step, self.call_in_step, self._last_t = -1, 0, None
        self._plans.clear()

    def release(self) -> None:
        """Drop what the session holds on the device (layouts, plans, mask reads); counts survive."""
        self.reset()
        self._layouts.clear()
        self._mask_reads.clear()
        if self._density_sum is not None:
            self._density_sum = torch.tensor(float(self._density_sum), dtype=torch.float64)  # read once, at removal

    def begin_forward(self, grid: tuple[int, int, int], timestep) -> None:
        """Record the token grid and the denoising step of the forward that starts now (the adapter
        then sets :attr:`tiled`, the token order of this forward).

        The step is the scheduler's ``step_index`` when it has one (no device read); otherwise the
        index of the timestep in the scheduler's ``timesteps``, or, for a bare transformer, a counter
        of timestep changes (a larger timestep than the last starts a new generation).
        """
        self.grid, self.tiled = grid, False
        self._mask_reads.clear()
        index = getattr(self.scheduler, "step_index", None) if self.scheduler is not None else None
        if index is not None:
            step = int(index)
        else:
            t = float(torch.as_tensor(timestep).max()) if timestep is not None else None  # one read per forward
            timesteps = getattr(self.scheduler, "timesteps", None)
            if t is not None and timesteps is not None and len(timesteps):
                step = int((torch.as_tensor(timesteps, dtype=torch.float64).cpu() - t).abs().argmin())
            elif t is None or t != self._last_t:
                step = self.step + 1 if (t is None or self._last_t is None or t < self._last_t) else 0
            else:
                step = self.step
            self._last_t = t
        if step < self.step:  # a new generation began
            self._plans.clear()
        self.call_in_step = self.call_in_step + 1 if step == self.step else 0
        self.step = step

    def num_steps(self) -> int | None:
        timesteps = getattr(self.scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None and len(timesteps) else None

    def dense_steps(self) -> int:
        steps = self.config.dense_steps
        if steps is None or isinstance(steps, float):
            total = self.num_steps()
            fraction = DEFAULT_DENSE_STEP_FRACTION if steps is None else steps
            return math.ceil(fraction * total) if total else 0
        return steps

    def runs_sparse(self, layer: int) -> bool:
        """Whether self-attention layer ``layer`` (depth index in the registry's list) runs sparse now."""
        return self.config.method is not None and layer >= self.config.dense_layers and self.step >= self.dense_steps()

    # ------------------------------------------------------------------ the SDPA-shaped entry
    def attend(self, query, key, value, *, layer: int, call: int = 0, attn_mask=None, dropout_p=0.0,
               is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
        """``scaled_dot_product_attention`` of one video self-attention call, computed sparse.

        ``query``/``key``/``value``: ``(B, heads, L, D)``; ``layer``: the layer's depth index;
        ``call``: the call's index within the layer's forward (a module may attend once per sample).
        A key-padding ``attn_mask`` (text padded at the end) runs each batch element on its unpadded
        prefix. Anything else a video self-attention should never get raises ``NotImplementedError``.
        """
        name = type(self).__name__
        if is_causal or dropout_p or enable_gqa or query.shape != key.shape or key.shape != value.shape:
            raise NotImplementedError(
                f"NYI: {name} got a self-attention call sparsevid cannot plan (is_causal={is_causal}, "
                f"dropout_p={dropout_p}, enable_gqa={enable_gqa}, q {tuple(query.shape)}, k {tuple(key.shape)})"
            )
        lengths = None if attn_mask is None else self._key_lengths(attn_mask, *query.shape[:3:2])
        if lengths is None:  # no mask, or one that keeps every key
            return self._sparse(query, key, value, scale, (layer, call))
        return self._with_key_padding(query, key, value, lengths, scale, (layer, call))

    def raster_layout(self) -> VideoLayout:
        """The layout of this forward's video tokens in raster order (whose ``perm`` tiles them)."""
        return self._layout(math.prod(self.grid), tiled=False)

    def _layout(self, length: int, tiled: bool | None = None) -> VideoLayout:
        tiled = self.tiled if tiled is None else tiled
        frames, height, width = self.grid
        text = length - frames * height * width
        if text < 0 or (text and self.spec.others is None):
            raise ValueError(
                f"Expect the self-attention sequence ({length} tokens) to be the latent grid {self.grid} "
                f"({frames * height * width} tokens){' plus other tokens' if self.spec.others else ''} but it is "
                f"{'shorter' if text < 0 else 'longer'}; the model registry's grid or module list is wrong for this model"
            )
        key = (frames, height, width, text, tiled)
        if key not in self._layouts:
            self._layouts[key] = VideoLayout(frames, height, width, text_tokens=text, text_first=self.spec.others == "first",
                                             tiled=tiled, **self.config.layout_options)
        return self._layouts[key]

    def _sparse(self, query, key, value, scale, tag) -> torch.Tensor:
        config = self.config
        layout = self._layout(query.shape[2])
        cache_key = (*tag, self.call_in_step, tuple(query.shape), layout.tiled, torch.is_inference_mode_enabled())
        cached = self._plans.get(cache_key)
        if cached is None or self.step - cached[0] >= config.replan_every or cached[0] > self.step:
            plan = make_plan(query, key, layout, config.method, density=config.density, mass=config.mass,
                             validate=False, **config.plan_options)
            cached = (self.step, plan)
            if config.replan_every > 1:  # kept only for reuse: every layer's plan held at once costs GBs at 720p
                self._plans[cache_key] = cached
            self.plans_made += 1
            with torch.no_grad():
                density = plan.density_per_head().mean()
                self._density_sum = density if self._density_sum is None else self._density_sum + density
        self.sparse_calls += 1
        out = sparse_attention(query, key, value, cached[1], scale=scale, backend=config.backend, quant=config.quant,
                               tail=config.tail)
        for observe in self.observers:
            observe(tag[0], self.step, query, key, value, out, scale)
        return out

    def _with_key_padding(self, query, key, value, lengths: list[int], scale, tag) -> torch.Tensor:
        """Joint attention whose padded text keys are masked (text after the video, padded at its end).

        Each batch element runs on its unpadded prefix (video + real text); padded query rows, whose
        outputs no video token reads, attend densely to the real keys.
        """
        L = query.shape[2]
        out = torch.empty_like(query)
        for b, n in enumerate(lengths):
            qb, kb, vb = (t[b : b + 1, :, :n] for t in (query, key, value))
            out[b : b + 1, :, :n] = self._sparse(qb, kb, vb, scale, (*tag, b, n))
            if n < L:
                out[b : b + 1, :, n:] = torch.nn.functional.scaled_dot_product_attention(
                    query[b : b + 1, :, n:], kb, vb, scale=scale)
        return out

    def _key_lengths(self, attn_mask: torch.Tensor, B: int, L: int) -> list[int] | None:
        """Real keys of each batch element under a key-padding mask; ``None`` when it keeps every key.

        Read once per forward for each mask (a model passes the same mask to every layer), with one
        device read for all it needs to know. Bool (True keeps) or additive (0 keeps, very negative
        drops); ``(B, L)``, ``(B, 1, L)``, ``(B, 1, 1, L)`` or ``(B, 1, L, L)`` built as
        ``keep_i & keep_j`` (a video query row is the key mask).
        """
        key = (tuple(attn_mask.shape), attn_mask.dtype, attn_mask.data_ptr())
        if key not in self._mask_reads:
            mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
            if mask.dim() == 4 and mask.shape[-2] == L:
                mask = mask[:, :, :1]
            mask = mask.reshape(mask.shape[0], *[1] * (4 - mask.dim()), *mask.shape[1:]) if mask.dim() < 4 else mask
            if mask.shape[1:3] != (1, 1):
                raise NotImplementedError(f"NYI: sparse attention under an attention mask of shape {tuple(attn_mask.shape)}")
            keep = mask.expand(B, 1, 1, L)[:, 0, 0]
            facts = torch.cat([keep.all().view(1), (keep.cumprod(-1).bool() == keep).all().view(1), keep.sum(-1)])
            all_kept, is_prefix, *lengths = facts.tolist()  # the one device read
            if not all_kept and (self.spec.others != "last" or not is_prefix):
                raise NotImplementedError(
                    "NYI: sparse attention under an attention mask that is not a key-padding mask of text after the "
                    "video (real keys first, padding last)"
                )
            self._mask_reads[key] = None if all_kept else [int(n) for n in lengths]
        return self._mask_reads[key]

    # ------------------------------------------------------------------ report
    def stats(self) -> dict:
        """Counts so far: ``sparse_calls``, ``dense_calls``, ``plans``, ``mean_density`` (one device read)."""
        mean = float(self._density_sum) / self.plans_made if self.plans_made else None
        return dict(sparse_calls=self.sparse_calls, dense_calls=self.dense_calls, plans=self.plans_made,
                    mean_density=mean)
