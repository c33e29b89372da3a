"""One call to make a diffusers video pipeline's self-attention sparse; one call to undo it.

Mechanism: diffusers hooks (``diffusers.hooks.HookRegistry``), the way diffusers' own cache
features attach, never a fork of model code.

- A *state* hook on the transformer reads, before every forward, the latent grid (from
  ``hidden_states`` and the config's patch sizes) and the denoising step (the index of
  ``timestep`` in the pipeline scheduler's ``timesteps``, or a counter of timestep changes for a
  bare transformer).
- An *attention* hook on each video self-attention module decides dense or sparse for this layer
  and step. When sparse, it runs the module's own processor under a ``TorchFunctionMode`` that
  routes that processor's ``scaled_dot_product_attention`` call (directly, or through diffusers'
  native attention backend) to :func:`sparsevid.sparse_attention` with a plan for this layer.
  Cross-attention modules are never hooked, and a dense decision calls the module untouched.

``remove()`` deletes the hooks (diffusers restores each ``forward``), after which the model is
exactly native again.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..attention import sparse_attention
from ..layout import VideoLayout
from ..planners import plan as make_plan

__all__ = ["SparseVidConfig", "SparseVidHandle", "apply", "remove", "supported_models"]

_STATE_HOOK = "sparsevid_state"
_ATTENTION_HOOK = "sparsevid_attention"
_DEFAULT_DENSE_STEP_FRACTION = 0.2
_TILING = ("tile", "block_size")  # planner options that shape the VideoLayout, built once per grid


# ---------------------------------------------------------------------------------------- config
@dataclass
class SparseVidConfig:
    """What :func:`apply` was asked for.

    Attributes:
        method (str | None): planner name (``sparsevid.available_planners()``); ``None``: native attention (reuse only).
        density (float | None): fraction of real score entries to compute (``None``: the planner's
            default, 0.1 for the sparse planners).
        mass (float | None): alternatively, attention mass to keep (draft, xattn).
        dense_steps (int | float | None): leading denoising steps run dense: an int count, or a
            fraction of the pipeline's steps. ``None``: 20% for a pipeline (the DraftAttention/SVG
            practice), 0 for a bare transformer (it cannot see the schedule).
        dense_layers (int): leading transformer blocks run dense (default 1).
        replan_every (int): recompute each layer's plan every this many steps, reuse in between.
        backend (str): ``sparse_attention`` backend (``"auto"``: Triton on CUDA).
        planner_options (dict): extra keyword arguments for the planner (``tile``, ``budget``, ...).
    """

    method: str = "draft"
    density: float | None = None
    mass: float | None = None
    dense_steps: int | float | None = None
    dense_layers: int = 1
    replan_every: int = 1
    backend: str = "auto"
    planner_options: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class _ModelSpec:
    self_attention: Callable[[torch.nn.Module], list[torch.nn.Module]]  # video self-attention, by depth
    grid: Callable[[torch.nn.Module, torch.Tensor], tuple[int, int, int]]  # (F, H, W) from hidden_states
    text_first: bool  # joint attention: where the text tokens sit in the attention sequence


def _patch_thw(config) -> tuple[int, int, int]:
    patch = config.patch_size
    if isinstance(patch, (tuple, list)):
        return tuple(patch)
    return (getattr(config, "patch_size_t", None) or 1, patch, patch)


def _grid_bcfhw(model, hidden_states):  # (B, C, F, H, W): Wan, HunyuanVideo
    pt, ph, pw = _patch_thw(model.config)
    f, h, w = hidden_states.shape[-3:]
    return (f // pt, h // ph, w // pw)


def _grid_bfchw(model, hidden_states):  # (B, F, C, H, W): CogVideoX (1.5 pads odd frames to p_t)
    pt, ph, pw = _patch_thw(model.config)
    f, h, w = hidden_states.shape[1], hidden_states.shape[-2], hidden_states.shape[-1]
    return (math.ceil(f / pt), h // ph, w // pw)


_MODELS: dict[str, _ModelSpec] = {
    "WanTransformer3DModel": _ModelSpec(lambda m: [b.attn1 for b in m.blocks], _grid_bcfhw, text_first=False),
    "HunyuanVideoTransformer3DModel": _ModelSpec(
        lambda m: [b.attn for b in m.transformer_blocks] + [b.attn for b in m.single_transformer_blocks],
        _grid_bcfhw,
        text_first=False,
    ),
    "CogVideoXTransformer3DModel": _ModelSpec(
        lambda m: [b.attn1 for b in m.transformer_blocks], _grid_bfchw, text_first=True
    ),
}


def supported_models() -> list[str]:
    """Transformer classes :func:`apply` knows."""
    return sorted(_MODELS)


# ---------------------------------------------------------------------------------------- state
class _State:
    """Per-transformer facts of the current forward, shared by its attention hooks."""

    def __init__(self, config: SparseVidConfig, scheduler, text_first: bool):
        self.config = config
        self.scheduler = scheduler
        self.text_first = text_first
        self.grid: tuple[int, int, int] | None = None
        self.step = -1
        self.call_in_step = 0
        self._last_t: float | None = None
        self.layouts: dict[tuple, VideoLayout] = {}
        self.plans: dict[tuple, tuple[int, Any]] = {}  # (layer, call, shape) -> (step planned, plan)
        self.densities: list[float] = []  # achieved density of each sparse attention call

    def reset(self) -> None:
        """Forget the step counter and cached plans (pipelines reset stateful hooks after each call).

        ``densities`` is a running record for :meth:`SparseVidHandle.stats` and survives resets.
        """
        self.step, self.call_in_step, self._last_t = -1, 0, None
        self.plans.clear()

    def begin_forward(self, hidden_states: torch.Tensor, timestep, grid: tuple[int, int, int]) -> None:
        self.grid = grid
        t = float(torch.as_tensor(timestep).flatten()[0]) if timestep is not None else None
        timesteps = getattr(self.scheduler, "timesteps", None)
        if t is not None and timesteps is not None and len(timesteps):
            step = int((torch.as_tensor(timesteps, dtype=torch.float64).cpu() - t).abs().argmin())
        elif t is None or t != self._last_t:
            step = self.step + 1 if (t is None or self._last_t is None or t < self._last_t) else 0
        else:
            step = self.step
        if step < self.step:  # a new generation began
            self.plans.clear()
        self.call_in_step = self.call_in_step + 1 if step == self.step else 0
        self.step, self._last_t = step, t

    def num_steps(self) -> int | None:
        timesteps = getattr(self.scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None and len(timesteps) else None

    def dense_step(self) -> bool:
        dense_steps = self.config.dense_steps
        if dense_steps is None:
            total = self.num_steps()
            dense_steps = math.ceil(_DEFAULT_DENSE_STEP_FRACTION * total) if total else 0
        elif isinstance(dense_steps, float):
            total = self.num_steps()
            if total is None:
                raise ValueError(
                    "Expect dense_steps as an int for a bare transformer (no scheduler to take a fraction of) "
                    f"but got {dense_steps}; pass the pipeline to sparsevid.apply or an int"
                )
            dense_steps = math.ceil(dense_steps * total)
        return self.step < dense_steps


# ---------------------------------------------------------------------------------------- hooks
def _hook_base():
    from diffusers.hooks import ModelHook

    return ModelHook


def _make_state_hook(state: _State, spec: _ModelSpec):
    class _SparseVidStateHook(_hook_base()):
        """Records the latent grid and the denoising step before every transformer forward."""

        _is_stateful = True

        @torch.compiler.disable  # reads the timestep on the host; runs eagerly under torch.compile
        def pre_forward(self, module, *args, **kwargs):
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            timestep = kwargs["timestep"] if "timestep" in kwargs else (args[2] if len(args) > 2 else None)
            state.begin_forward(hidden_states, timestep, spec.grid(module, hidden_states))
            return args, kwargs

        def reset_state(self, module):
            state.reset()
            return module

    return _SparseVidStateHook()


def _refuse_ring_attention(module: torch.nn.Module) -> None:
    """Context parallelism: Ulysses works unchanged, ring attention is refused.

    After Ulysses' all-to-all every rank holds the whole sequence for a subset of heads, so each
    rank plans its own heads exactly as one GPU would (the step and layer decisions come from the
    timestep and the layer index, the same on every rank). Ring attention gives each rank a
    sequence chunk and merges partial softmaxes through kernels that return log-sum-exp, which a
    block plan over the full grid does not split into; it would silently stay dense, so it is an
    error instead.
    """
    parallel = getattr(getattr(module, "processor", None), "_parallel_config", None)
    context = getattr(parallel, "context_parallel_config", None)
    if context is not None and (context.ring_degree or 1) > 1:
        raise NotImplementedError(
            f"NYI: sparsevid under ring attention (ring_degree={context.ring_degree}); "
            "use ContextParallelConfig(ulysses_degree=...) with ring_degree=1"
        )


class _SdpaToSparse(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` inside one attention module to sparsevid."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.attend(*args, **kwargs)
        return func(*args, **kwargs)


def _make_attention_hook(state: _State, layer: int):
    class _SparseVidAttentionHook(_hook_base()):
        """Dense or sparse for this layer and step; sparse runs the module under ``_SdpaToSparse``."""

        # Eager under torch.compile: per-step decisions and planning are host-side work; the rest of
        # the transformer (MLPs, norms, cross-attention) still compiles.
        @torch.compiler.disable
        def new_forward(self, module, *args, **kwargs):
            config = state.config
            _refuse_ring_attention(module)
            if layer < config.dense_layers or state.dense_step():
                return self.fn_ref.original_forward(*args, **kwargs)
            with _SdpaToSparse(self._attend):
                return self.fn_ref.original_forward(*args, **kwargs)

        def _attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
            if is_causal or dropout_p or query.shape != key.shape or extra.get("enable_gqa"):
                return F.scaled_dot_product_attention(
                    query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra
                )
            if attn_mask is not None and attn_mask.dtype == torch.bool and bool(attn_mask.all()):
                attn_mask = None
            if attn_mask is None:
                return self._sparse(query, key, value, scale, state.text_first)
            return self._sparse_with_key_padding(query, key, value, attn_mask, scale)

        def _layout(self, length: int, text_first: bool) -> VideoLayout:
            frames, height, width = state.grid
            text = length - frames * height * width
            if text < 0:
                raise ValueError(
                    f"Expect the attention sequence ({length} tokens) to hold the latent grid {state.grid} "
                    f"({frames * height * width} tokens) but it is shorter; is this a video self-attention module?"
                )
            key = (frames, height, width, text, text_first)
            if key not in state.layouts:
                tiling = {k: v for k, v in state.config.planner_options.items() if k in _TILING}
                state.layouts[key] = VideoLayout(frames, height, width, text_tokens=text, text_first=text_first, **tiling)
            return state.layouts[key]

        def _sparse(self, query, key, value, scale, text_first, cache_tag=()):
            config = state.config
            layout = self._layout(query.shape[2], text_first)
            cache_key = (layer, state.call_in_step, tuple(query.shape), *cache_tag)
            cached = state.plans.get(cache_key)
            if cached is None or state.step - cached[0] >= config.replan_every or cached[0] > state.step:
                options = {k: v for k, v in config.planner_options.items() if k not in _TILING}
                plan = make_plan(
                    query, key, layout, config.method, density=config.density, mass=config.mass, validate=False, **options
                )
                state.plans[cache_key] = cached = (state.step, plan)
                state.densities.append(plan.density)
            return sparse_attention(query, key, value, cached[1], scale=scale, backend=config.backend)

        def _sparse_with_key_padding(self, query, key, value, attn_mask, scale):
            """Joint attention whose padded text keys are masked (HunyuanVideo, text last).

            Each batch element runs on its unpadded prefix (video + real text); padded query rows,
            whose outputs no video token ever reads, attend densely to the real keys.
            """
            B, H, L, D = query.shape
            keys_real = attn_mask.expand(B, 1, 1, L)[:, 0, 0] if attn_mask.dim() == 4 else None
            prefix = keys_real.cumprod(-1).bool() if keys_real is not None else None
            if keys_real is None or state.text_first or not torch.equal(prefix, keys_real):
                warnings.warn("sparsevid: this attention mask is not a text key-padding mask; running dense")
                return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
            out = torch.empty_like(query)
            for b in range(B):
                n = int(keys_real[b].sum())
                qb, kb, vb = (t[b : b + 1, :, :n] for t in (query, key, value))
                out[b : b + 1, :, :n] = self._sparse(qb, kb, vb, scale, False, cache_tag=(b,))
                if n < L:
                    out[b : b + 1, :, n:] = F.scaled_dot_product_attention(query[b : b + 1, :, n:], kb, vb, scale=scale)
            return out

    return _SparseVidAttentionHook()


# ---------------------------------------------------------------------------------------- public
class SparseVidHandle:
    """What :func:`apply` returns: ``.remove()`` restores native behaviour; ``.stats()`` reports."""

    def __init__(self, transformers: list[torch.nn.Module], states: list[_State], config: SparseVidConfig,
                 reuse_handles: list | None = None):
        self.transformers = transformers
        self.states = states
        self.config = config
        self.reuse_handles = reuse_handles or []

    def stats(self) -> dict:
        """Sparse attention calls planned so far and their mean achieved density.

        With ``reuse=``, ``"reuse"`` holds one ``ReuseHandle.stats()`` per transformer (token-replay
        rows and replay rate per block, the step cache's name).
        """
        densities = [d for s in self.states for d in s.densities]
        out = {"plans": len(densities), "mean_density": sum(densities) / len(densities) if densities else None}
        if self.reuse_handles:
            out["reuse"] = [h.stats() for h in self.reuse_handles]
        return out

    def reset(self) -> None:
        """Forget cached plans and the step counter (a new generation with a bare transformer)."""
        for s in self.states:
            s.reset()

    def remove(self) -> None:
        for transformer in self.transformers:
            _remove_reuse(transformer)
            _remove_hooks(transformer)
        self.transformers, self.states, self.reuse_handles = [], [], []


def _transformers_of(target) -> tuple[list[torch.nn.Module], Any]:
    if isinstance(target, torch.nn.Module):
        return [target], None
    found = [getattr(target, name, None) for name in ("transformer", "transformer_2")]
    found = [t for t in found if isinstance(t, torch.nn.Module)]
    if not found:
        raise TypeError(
            f"Expect a diffusers pipeline (with .transformer) or a transformer model but got {type(target).__name__}"
        )
    return found, getattr(target, "scheduler", None)


def apply(
    target,
    method: str | None = "draft",
    density: float | None = None,
    *,
    mass: float | None = None,
    dense_steps: int | float | None = None,
    dense_layers: int = 1,
    replan_every: int = 1,
    backend: str = "auto",
    reuse=None,
    **planner_options,
) -> SparseVidHandle:
    """Make ``target``'s video self-attention sparse. See :class:`SparseVidConfig` for the options.

    Args:
        target: a diffusers pipeline (its ``transformer`` and, for Wan2.2, ``transformer_2``) or a
            transformer model of a class in :func:`supported_models`.
        method (str | None): planner name; ``None`` leaves attention native (``reuse`` only).
        reuse: temporal reuse on top (see :mod:`sparsevid.reuse`): ``None``, a
            ``sparsevid.reuse.TokenReplay`` (FFN replay across adjacent frames, Wan), a diffusers
            step-cache config (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``, ``MagCacheConfig``,
            ... attached with ``transformer.enable_cache``), or a list with at most one of each.

    Returns:
        SparseVidHandle; ``handle.remove()`` (or :func:`remove`) restores native behaviour exactly.

    Raises:
        TypeError / ValueError: unsupported model (the message lists the supported ones), bad options.
    """
    from ..planners import available_planners
    from ..reuse import split_reuse

    if method is not None and method not in available_planners():
        raise ValueError(f"Expect method in {available_planners()} (or None: reuse only) but got {method!r}")
    token_replay, step_cache = split_reuse(reuse)  # TypeError / ValueError naming reuse, before any hook
    for name, value in (("dense_layers", dense_layers), ("replan_every", replan_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "replan_every" else 0):
            raise ValueError(f"Expect {name} to be an int >= {1 if name == 'replan_every' else 0} but got {value!r}")
    if dense_steps is not None and (
        isinstance(dense_steps, bool)
        or not isinstance(dense_steps, (int, float))
        or dense_steps < 0
        or (isinstance(dense_steps, float) and dense_steps >= 1)
    ):
        raise ValueError(f"Expect dense_steps as an int >= 0 or a fraction in [0, 1) but got {dense_steps!r}")
    transformers, scheduler = _transformers_of(target)
    config = SparseVidConfig(method, density, mass, dense_steps, dense_layers, replan_every, backend, dict(planner_options))

    from diffusers.hooks import HookRegistry

    states = []
    for transformer in transformers:
        name = type(transformer).__name__
        if name not in _MODELS:
            raise ValueError(f"Expect a transformer of {supported_models()} but got {name}")
        if HookRegistry.check_if_exists_or_initialize(transformer).get_hook(_STATE_HOOK) is not None:
            raise ValueError(f"Expect a model without sparsevid applied but {name} has it; call sparsevid.remove first")
        if step_cache is not None and getattr(transformer, "is_cache_enabled", False):
            raise ValueError(f"Expect reuse with a step cache on a model without one but {name} has a cache enabled; "
                             "call transformer.disable_cache() first")
        if token_replay is not None and name != "WanTransformer3DModel":
            raise NotImplementedError(f"NYI: reuse=TokenReplay for {name} (supported: WanTransformer3DModel)")
    for transformer in transformers:
        spec = _MODELS[type(transformer).__name__]
        state = _State(config, scheduler, spec.text_first)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_make_state_hook(state, spec), _STATE_HOOK)
        for layer, module in enumerate(spec.self_attention(transformer) if method is not None else []):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                _make_attention_hook(state, layer), _ATTENTION_HOOK
            )
        states.append(state)
    reuse_handles = []
    if reuse is not None:
        from ..reuse import apply as apply_reuse

        try:
            for transformer in transformers:
                handle = apply_reuse(transformer, reuse)
                transformer._sparsevid_reuse = handle
                reuse_handles.append(handle)
        except Exception:  # a refused reuse config leaves the model as it was
            for transformer in transformers:
                _remove_reuse(transformer)
                _remove_hooks(transformer)
            raise
    return SparseVidHandle(transformers, states, config, reuse_handles)


def _remove_reuse(transformer: torch.nn.Module) -> None:
    handle = transformer.__dict__.pop("_sparsevid_reuse", None)
    if handle is not None:
        handle.remove()


def _remove_hooks(transformer: torch.nn.Module) -> None:
    spec = _MODELS[type(transformer).__name__]
    for module in spec.self_attention(transformer):
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry.remove_hook(_ATTENTION_HOOK, recurse=False)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(_STATE_HOOK, recurse=False)


def remove(target) -> None:
    """Remove sparsevid from a pipeline or transformer (no-op where it is not applied)."""
    for transformer in _transformers_of(target)[0]:
        if type(transformer).__name__ in _MODELS:
            _remove_reuse(transformer)
            _remove_hooks(transformer)
