"""The framework-neutral core of every integration: step schedule, caches, the SDPA-shaped entry point,
the one SDPA interceptor (:class:`SdpaRoute`) and the base of the handles ``apply`` returns (:class:`Handle`).
The settings are :class:`sparsevid.config.SparseVidConfig`.

An adapter (diffusers hooks, a ComfyUI node) owns one :class:`SparseSession` per transformer and
does three things: around each forward it calls :meth:`SparseSession.begin_forward` with the call's
arguments (bound by name, see :func:`sparsevid.integrations.models.bind_call`) and
:meth:`~SparseSession.end_forward` (also when the forward raised); for each video self-attention
layer it asks :meth:`SparseSession.runs_sparse`; and it routes a sparse layer's attention call to
:meth:`SparseSession.attend` (``scaled_dot_product_attention``'s arguments, ``(B, heads, L, D)``
tensors), or under ring attention to :meth:`SparseSession.attend_ring` (a rank's sequence chunk).
Everything else — which step this is and when a generation starts, whether the step and layer run
dense, the token layout, planning, plan reuse across steps, text tokens and key-padding masks, the
Ulysses head order (:attr:`SparseSession.head_balance`), and the counts a handle reports — lives
here, so every adapter behaves alike.

No host sync on the sparse path once a generation runs: the step comes from the scheduler's
``step_index`` (a Python int; the timestep value is read once when it is not known yet), plans and
their statistics stay on the device (but for one read at the first plan of each new layout, which
compares the density landed with the one asked), and key-padding masks are read once per forward.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict

import torch
from torch.overrides import TorchFunctionMode

from ..attention import check_scale, sparse_attention
from ..backends import resolve_backend
from ..cluster_plan import ClusterPlan
from ..config import DEFAULT_DENSE_STEP_FRACTION, SparseVidConfig
from ..parallel.head_balance import HeadBalance
from ..layout import VideoLayout
from .models import ModelSpec
from ..plan import BlockPlan
from ..planners import plan as make_plan
from ..planners import planner_spec
from ..planners._select import _forced_entries
from ..parallel.ring import RingGroup, gather_sequence, ring_backend, ring_rank_attention
from ..tail import check_tail

__all__ = ["DEFAULT_DENSE_STEP_FRACTION", "Handle", "SdpaRoute", "SparseSession", "SparseVidConfig", "budget",
           "describe_budget"]

_MAX_LAYOUTS = 16  # a forward needs one per token order and key-padding length in its batch (a new length adds one)
_OVERSHOOT = 1.2  # a plan computing more than this times the density asked is worth a warning


def _refuse_copy(how: str):
    # diffusers' hook chain is closures over the original model: a copy would run the original's hooks and weights
    raise TypeError(f"Expect a model without sparsevid applied for {how} but got one with it; call handle.remove() "
                    "(or sparsevid.remove(model)) first, then sparsevid.apply again to the original and the copy")


class SparseSession:
    """One transformer's sparse-attention state: schedule, layouts, plans, and counts.

    Args:
        config (SparseVidConfig): validated settings.
        spec (ModelSpec): the model's registry entry (grid, timestep, where other tokens sit).
        scheduler (callable | None): returns the scheduler the pipeline uses now (read at every forward,
            so a scheduler swapped after ``apply`` is the one followed); ``None`` for a bare transformer.
        name (str): the model's class name, for messages.

    One forward at a time: a forward that starts while another thread is inside one of the same model
    raises (the step count, layouts and plans are the model's). A forward that raised ends its
    generation: the next forward plans afresh.
    """

    def __init__(self, config: SparseVidConfig, spec: ModelSpec, scheduler=None, name: str = "model"):
        self.config = config
        self.spec = spec
        self.scheduler = scheduler
        self.name = name
        self.grid: tuple[int, int, int] | None = None
        self.tiled = False  # this forward's video tokens travel in tile order (set by the adapter)
        self.step = -1
        self.call_in_step = 0
        self._last_t: float | None = None
        self._timesteps = None  # the schedule of the generation running; another one starts a new generation
        self._warmup = 0  # leading steps of this generation run dense
        self._in_forward = threading.Lock()
        self._layouts: OrderedDict[tuple, VideoLayout] = OrderedDict()  # least recently used first
        self._plans: dict[tuple, tuple[int, object]] = {}  # cache key -> (step planned, plan)
        # cache key (layer, call, CFG branch = call in step, shape, ...) -> the last plan's centroids: the next
        # plan of that key starts from them (planners whose plans carry centroids: ``clustered``)
        self._centroids: dict[tuple, tuple] = {}
        self._mask_reads: dict[tuple, object] = {}  # what this forward's masks hold, read once each
        self._warned: set[str] = set()  # warnings given once per session
        self._unchecked: set[VideoLayout] = set()  # cached layouts whose first plan's density is not compared yet
        self.sparse_calls = 0  # attention calls computed by sparsevid
        self.backends: set[str] = set()  # the backends that ran them (recorded with each new plan)
        self.dense_calls = 0  # attention calls of hooked layers left native (dense layers and steps)
        self.plans_made = 0
        self.head_balance = HeadBalance()  # the Ulysses head order of each layer (config.head_balance)
        self._density_sum: torch.Tensor | None = None  # on the device: no sync per plan
        # called as ``observe(layer, step, query, key, value, out, scale)`` after each sparse call (measurement
        # harnesses, e.g. eval's per-step error; empty in normal use)
        self.observers: list = []

    def __deepcopy__(self, memo):
        _refuse_copy("copy.deepcopy")

    def __reduce_ex__(self, protocol):
        _refuse_copy("pickle")

    # ------------------------------------------------------------------ schedule
    def reset(self) -> None:
        """Forget the step counter, cached plans and centroids (a pipeline call ended); counts survive."""
        self.step, self.call_in_step, self._last_t, self._timesteps = -1, 0, None, None
        self._plans.clear()
        self._centroids.clear()

    def release(self) -> None:
        """Drop what the session holds on the device (layouts, plans, mask reads); counts survive."""
        self.reset()
        self._layouts.clear()
        self._unchecked.clear()
        self._mask_reads.clear()
        self.head_balance.reset()
        if self._density_sum is not None:
            self._density_sum = torch.tensor(float(self._density_sum), dtype=torch.float64)  # read once, at removal

    def begin_forward(self, grid: tuple[int, int, int], timestep, *, step: int | None = None,
                      steps: int | None = None) -> None:
        """Start a forward: record the token grid and the denoising step (the adapter then sets
        :attr:`tiled`, the token order of this forward). Pair with :meth:`end_forward`.

        The step is the scheduler's ``step_index`` when it has one (no device read); otherwise the
        index of the timestep in the scheduler's ``timesteps``; otherwise ``step``/``steps`` as the
        framework tells them (diffusers' ``cache_context``); otherwise a counter of timestep changes
        (a larger timestep than the last starts a new generation). A new generation starts with a new
        schedule (the scheduler's ``timesteps`` object), a step below the last, or after a failed forward.

        Raises:
            RuntimeError: another thread is inside a forward of this model.
        """
        if not self._in_forward.acquire(blocking=False):
            raise RuntimeError(
                f"Expect one forward at a time through a {self.name} with sparsevid applied but another thread is "
                "inside one (its step count, layouts and plans are the model's); give each thread its own model "
                "(load it per thread and sparsevid.apply to each)"
            )
        try:
            self._begin(grid, timestep, step, steps)
        except BaseException:
            self._in_forward.release()
            raise

    def end_forward(self, failed: bool = False) -> None:
        """End the forward :meth:`begin_forward` started; ``failed``: it raised (an interrupted
        generation), so the next forward starts a new one instead of reusing this one's plans."""
        if failed:
            self.reset()
        self._mask_reads.clear()
        self._in_forward.release()

    def _begin(self, grid, timestep, step, steps) -> None:
        self.grid, self.tiled = grid, False
        self._mask_reads.clear()
        scheduler = self.scheduler() if self.scheduler is not None else None
        timesteps = getattr(scheduler, "timesteps", None)
        timesteps = timesteps if timesteps is not None and len(timesteps) else None
        index = getattr(scheduler, "step_index", None)
        if index is not None:
            step = int(index)
        elif timesteps is not None and timestep is not None:
            t = float(torch.as_tensor(timestep).max())  # one read per forward
            step = int((torch.as_tensor(timesteps, dtype=torch.float64).cpu() - t).abs().argmin())
        elif step is None:
            t = float(torch.as_tensor(timestep).max()) if timestep is not None else None
            if t is None or t != self._last_t:
                step = self.step + 1 if (t is None or self._last_t is None or t < self._last_t) else 0
            else:
                step = self.step
            self._last_t = t
        if timesteps is not None:
            steps = len(timesteps)
        if step < self.step or self.step < 0 or (timesteps is not None and timesteps is not self._timesteps):
            self._new_generation(timesteps, steps)
        self.call_in_step = self.call_in_step + 1 if step == self.step else 0
        self.step = step

    def _new_generation(self, timesteps, steps: int | None) -> None:
        """Drop the last generation's plans and centroids; fix this generation's dense warm-up from its schedule."""
        self._plans.clear()
        self._centroids.clear()
        self.step, self.call_in_step, self._timesteps = -1, 0, timesteps
        asked = self.config.dense_steps
        if self.config.method is None:  # native attention (reuse only): no warm-up to fix
            self._warmup = 0
            return
        if steps is None and isinstance(asked, float):
            raise ValueError(
                f"Expect a schedule to take dense_steps={asked} of but this {self.name} call has none (no pipeline "
                "scheduler, no diffusers cache_context with num_inference_steps); pass the pipeline to "
                "sparsevid.apply, or dense_steps as an int"
            )
        if asked is None and steps is None:
            self._warmup = 0
            self._warn_once("warm-up", f"sparsevid: no schedule to read for this {self.name} (no pipeline scheduler, "
                            "no diffusers cache_context with num_inference_steps): no leading step runs dense, where "
                            f"a pipeline's first {DEFAULT_DENSE_STEP_FRACTION:.0%} would; pass dense_steps=N to choose")
        elif asked is None or isinstance(asked, float):
            fraction = DEFAULT_DENSE_STEP_FRACTION if asked is None else asked
            self._warmup = math.ceil(fraction * steps)
        else:
            self._warmup = asked
        if steps is not None and self._warmup >= steps:
            warnings.warn(f"sparsevid: dense_steps={asked if asked is not None else 'default'} makes all "
                          f"{self._warmup} of this generation's {steps} steps dense: nothing runs sparse; lower "
                          "dense_steps", stacklevel=2)

    def runs_sparse(self, layer: int) -> bool:
        """Whether self-attention layer ``layer`` (depth index in the registry's list) runs sparse now."""
        return self.config.method is not None and layer >= self.config.dense_layers and self.step >= self._warmup

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=3)

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
        self.sparse_calls += 1  # one call, however many batch elements a key-padding mask splits it into
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
        layout = self._layouts.get(key)
        if layout is None:
            layout = VideoLayout(frames, height, width, text_tokens=text, text_first=self.spec.others == "first",
                                 tiled=tiled, **self.config.layout_options)
            self._layouts[key] = layout
            if len(self._layouts) > _MAX_LAYOUTS:
                self._unchecked.discard(self._layouts.popitem(last=False)[1])
            if "density" not in self._warned:
                self._unchecked.add(layout)
        self._layouts.move_to_end(key)
        return layout

    def _sparse(self, query, key, value, scale, tag) -> torch.Tensor:
        layout, cache_key = self._plan_key(query.shape, tag)
        plan = self._cached_plan(cache_key)
        fresh = plan is None
        if fresh:
            plan = self._new_plan(query, key, layout, cache_key, tag)
        tail = check_tail(self.config.tail, plan)  # "auto" is the plan type's tail: known only with the plan
        if fresh:
            needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
            self.backends.add(resolve_backend(self.config.backend, query, plan, needs_grad, self.config.quant,
                                              tail).name)
        out = sparse_attention(query, key, value, plan, scale=scale, backend=self.config.backend,
                               quant=self.config.quant, tail=tail)
        for observe in self.observers:
            observe(tag[0], self.step, query, key, value, out, scale)
        return out

    def _plan_key(self, shape, tag) -> tuple[VideoLayout, tuple]:
        """The layout of a call of q's ``shape`` and the key of its plan in the cache (the head order
        is part of it: a plan made for one order of heads is never reused under another)."""
        layout = self._layout(shape[2])
        return layout, (*tag, self.call_in_step, tuple(shape), layout.tiled, torch.is_inference_mode_enabled(),
                        self.head_balance.version(tag[:2]))

    def _cached_plan(self, cache_key):
        """The cached plan to reuse for ``cache_key`` now, or ``None`` (replan)."""
        cached = self._plans.get(cache_key)
        if cached is None or self.step - cached[0] >= self.config.replan_interval or cached[0] > self.step:
            return None
        return cached[1]

    def _new_plan(self, query, key, layout: VideoLayout, cache_key: tuple, tag: tuple):
        config = self.config
        warm = self._centroids.get(cache_key)
        options = config.plan_options if warm is None else {**config.plan_options, "centroids": warm}
        plan = make_plan(query, key, layout, config.method, density=config.density, mass=config.mass,
                         validate=False, **options)
        if getattr(plan, "centroids", None) is not None:  # device tensors, kept as they are: no host read
            self._centroids[cache_key] = plan.centroids
        if config.replan_interval > 1:  # kept only for reuse: every layer's plan held at once costs GBs at 720p
            self._plans[cache_key] = (self.step, plan)
        self.plans_made += 1
        with torch.no_grad():
            density = plan.density_per_head().mean()
            self._density_sum = density if self._density_sum is None else self._density_sum + density
        if layout in self._unchecked:
            self._unchecked.discard(layout)
            self._check_density(plan, layout, query, key)
        if config.head_balance:
            self.head_balance.record(tag[:2], plan, query.shape[1], self.step)
        return plan

    def attend_ring(self, query, key, value, *, layer: int, call: int = 0, ring: RingGroup,
                    scale=None) -> torch.Tensor:
        """One video self-attention call under ring attention, computed sparse (:mod:`sparsevid.parallel.ring`).

        ``query``/``key``/``value``: ``(B, heads, C, D)``, ring rank ``ring.rank``'s chunk of a sequence
        of ``ring.size * C`` tokens (equal chunks in sequence order). The ring gathers the chunks (q only
        where this call plans), the plan is the one-GPU plan of the whole sequence, and the rank's
        steps skip the key chunks its query chunk keeps nothing of. Returns the rank's ``(B, heads, C, D)``.
        Observers (:attr:`observers`) are not called: no rank holds a whole call's output.
        """
        config, name = self.config, type(self).__name__
        if self.spec.others is not None:
            raise NotImplementedError(f"NYI: {name} under ring attention for a model with text tokens in its "
                                      "self-attention sequence (diffusers splits only the video tokens)")
        if config.quant is not None:
            raise NotImplementedError(f"NYI: quant={config.quant!r} under ring attention (the 8-bit kernels have no "
                                      "ring step); use quant=None")
        B, H, C, D = query.shape
        scale = check_scale(scale, D)
        layout, cache_key = self._plan_key((B, H, C * ring.size, D), (layer, call))
        plan = self._cached_plan(cache_key)
        if plan is None:
            q_all, k_all, v_all = gather_sequence((query, key, value), ring)
            plan = self._new_plan(q_all, k_all, layout, cache_key, (layer, call))
            if isinstance(plan, BlockPlan):
                self.backends.add(ring_backend(config.backend, query, plan, config.tail))
        else:
            k_all, v_all = gather_sequence((key, value), ring)
        if not isinstance(plan, BlockPlan):
            raise NotImplementedError(f"NYI: {config.method!r}'s {type(plan).__name__} under ring attention "
                                      "(a BlockPlan only)")
        self.sparse_calls += 1
        return ring_rank_attention(query, k_all, v_all, plan, ring.rank, ring.size, scale, config.tail,
                                   config.backend)[0]

    def _check_density(self, plan, layout: VideoLayout, query, key) -> None:
        """Warn (once) when a layout's plans compute well over the density asked: a grid of few blocks
        cannot honour it (one device read, at the first plan of each new layout)."""
        kind, asked, _ = budget(self.config)
        landed = plan.density if kind == "density" else None
        if landed is None or landed <= _OVERSHOOT * asked:
            return
        if isinstance(plan, ClusterPlan):  # no blocks: what it forces is the key clusters of its own tokens
            self._warn_once("density", f"sparsevid: density={asked} asked but the clustered plans of this {self.name}'s "
                            f"{layout.num_tokens}-token calls compute {landed:.2f} of the entries (every query keeps "
                            f"the key clusters holding its cluster's own tokens{', and text is dense' if layout.text_tokens else ''}); "
                            "more, smaller clusters (q_clusters, k_clusters) land closer")
            self._unchecked.clear()
            return
        bs, nb = layout.block_size, layout.num_blocks
        forced = _forced_entries(layout) / layout.num_tokens**2
        reason = (f"every query block keeps its own block{' and the text blocks' if layout.text_tokens else ''}, "
                  f"{forced:.2f} of the entries alone" if forced > asked
                  else f"budgets are whole blocks and a row has only {nb}")
        fix = "no smaller block size honours it"
        for smaller in (b for b in (64, 32, 16) if b < bs):  # powers of two, as the Triton kernels take
            tile = layout.tile if layout.tile[0] * layout.tile[1] <= smaller else None
            try:
                option = make_plan(query, key, layout.replace(block_size=smaller, tile=tile), self.config.method,
                                   density=asked, validate=False, **self.config.plan_options).density
            except ValueError:  # an option the smaller block does not take (xattn's stride)
                continue
            if option <= _OVERSHOOT * asked:
                fix = f"block_size={smaller} would land {option:.2f}"
                break
        grid = (f"{layout.frames}x{layout.height}x{layout.width} grid ({layout.num_tokens} tokens, {nb} block"
                f"{'s' if nb > 1 else ''} of {bs})")
        self._warn_once("density", f"sparsevid: density={asked} asked but the plans of this {self.name}'s {grid} "
                        f"compute {landed:.2f} of the entries ({reason}); {fix}. Every such call still counts as "
                        "sparse in stats()")
        self._unchecked.clear()

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
        """Counts so far: ``sparse_calls`` (one per attention call, whatever its batch), ``dense_calls``,
        ``plans``, ``mean_density`` (one device read), the ``budget`` the planner spends
        (:func:`describe_budget`), the ``tail`` method, ``replan_every`` (resolved: the planner's default where
        ``None`` was asked), and the ``backends`` that computed the sparse calls (sorted names; ``auto``
        resolved)."""
        mean = float(self._density_sum) / self.plans_made if self.plans_made else None
        return dict(sparse_calls=self.sparse_calls, dense_calls=self.dense_calls, plans=self.plans_made,
                    mean_density=mean, budget=describe_budget(self.config), tail=self.config.tail,
                    replan_every=self.config.replan_interval, backends=sorted(self.backends))


def budget(config: SparseVidConfig) -> tuple[str | None, object, bool]:
    """What the planner spends: ``(kind, value, is_the_planner's_default)``, kind ``"density"``,
    ``"mass"``, ``"radius"`` (``window``), or ``None`` (native attention, or a planner whose default
    sparsevid does not know)."""
    if config.method is None:
        return None, None, False
    if config.density is not None:
        return "density", config.density, False
    if config.mass is not None:
        return "mass", config.mass, False
    if config.method == "window" and config.plan_options.get("radius") is not None:
        return "radius", config.plan_options["radius"], False
    kind, value = planner_spec(config.method).default or (None, None)
    return kind, value, True


def describe_budget(config: SparseVidConfig) -> str:
    """The budget as a user reads it, e.g. ``"mass=0.9 (xattn's default)"``."""
    kind, value, default = budget(config)
    if config.method is None:
        return "native attention"
    if kind is None:
        return f"{config.method}'s default"
    return f"{kind}={value}" + (f" ({config.method}'s default)" if default else "")


class SdpaRoute(TorchFunctionMode):
    """While active, every ``F.scaled_dot_product_attention`` call goes to ``handle(func, args, kwargs)`` (``func``:
    the SDPA function itself, to call where the handler keeps it); every other function runs as called. The
    one interceptor of processors that call SDPA directly: routing them to sparsevid (the diffusers adapter)
    or recording their inputs (eval's per-layer capture)."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            return self.handle(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))


class Handle:
    """The base of what an ``apply`` returns (sparse attention, reuse, FastCar): :meth:`stats` reports,
    :meth:`remove` undoes, once (a second call does nothing), and the last :meth:`stats` stay readable after
    it; ``with`` removes on exit. Subclasses give ``_stats()`` and ``_remove()``."""

    _final: dict | None = None  # stats() when removed

    def stats(self) -> dict:
        """What the handle counted (each subclass's ``_stats`` says what); after :meth:`remove`, its last counts."""
        return self._final if self._final is not None else self._stats()

    def remove(self) -> None:
        """Undo the ``apply`` that returned this handle (each subclass's ``_remove`` says how); once."""
        if self._final is None:
            self._final = self._stats()
            self._remove()

    def _stats(self) -> dict:
        raise NotImplementedError

    def _remove(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
