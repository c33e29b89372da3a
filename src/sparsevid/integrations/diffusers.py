"""The diffusers adapter: one call makes a pipeline's video self-attention sparse, one call undoes it.

Mechanism — diffusers' own plug-in points, never a fork of model code:

- Hooks (``diffusers.hooks.HookRegistry``, the way diffusers' cache features attach): a *state*
  hook on the transformer binds each forward call to the forward's signature and tells the
  framework-neutral :class:`~sparsevid.integrations.core.SparseSession` the token grid and the
  timestep (what to read comes from :mod:`sparsevid.integrations.models`); an *attention* hook on each video
  self-attention module asks the session whether this layer runs sparse now. A dense layer or step
  calls the module untouched.
- Routing a sparse layer's attention call, whatever attention backend the user chose: diffusers
  processors call ``dispatch_attention_fn``, which looks the backend function up in
  ``_AttentionBackendRegistry._backends``. While any sparsevid handle is live, every registered
  backend function there is wrapped: inside a sparse layer's forward the wrapper hands the call to
  the session (in diffusers' ``(B, L, heads, D)`` layout; under context parallelism with diffusers'
  meshes: Ulysses through its own all-to-all template, ring and hybrid through
  :meth:`~sparsevid.integrations.core.SparseSession.attend_ring`, optionally with the heads dealt by
  :mod:`sparsevid.parallel.head_balance`), everywhere else it calls the user's backend unchanged. So
  ``set_attention_backend("flash")``, ``attention_backend("sage")`` or ``"flex"`` — set before or
  after :func:`apply` — keep serving the dense layers, and the sparse ones run on sparsevid. This
  touches diffusers' private registry: tested with diffusers 0.42.1; an incompatible diffusers is
  refused at apply time. Processors that call ``F.scaled_dot_product_attention`` directly
  (CogVideoX, Mochi, Allegro, ...) are routed by a ``TorchFunctionMode`` around the module.
- Never a silent no-op: a sparse layer whose forward made no attention call sparsevid could route
  raises, and ``handle.stats()`` counts the sparse and dense calls.
- Threads: the routing is per thread (a model in another thread keeps its own attention), and one
  hooked model takes one forward at a time (a second thread's forward raises; see ``SparseSession``).

``remove()`` deletes the hooks (diffusers restores each ``forward``) and, with the last handle,
the backend wrappers: the model is exactly native again.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..config import DEFAULT_DENSE_STEP_FRACTION, SparseVidConfig
from .core import Handle, SdpaRoute, SparseSession, describe_budget
from .models import bind_call, model_spec, supported_models

__all__ = ["SparseVidConfig", "SparseVidHandle", "apply", "remove", "supported_models"]

_STATE_HOOK = "sparsevid_state"
_ATTENTION_HOOK = "sparsevid_attention"
TESTED_DIFFUSERS = ("0.42.1",)


# ---------------------------------------------------------------------------------------- routing
class _SparseForward:
    """One sparse layer's forward in progress: where its attention calls go, and how many went."""

    def __init__(self, session: SparseSession, layer: int, module: torch.nn.Module):
        self.session = session
        self.layer = layer
        self.module = module
        self.calls = 0

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False) -> torch.Tensor:
        """SDPA arguments, ``(B, heads, L, D)``."""
        out = self.session.attend(query, key, value, layer=self.layer, call=self.calls, attn_mask=attn_mask,
                                  dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        self.calls += 1
        return out

    def attend_dispatched(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, return_lse=False, _parallel_config=None, **extra) -> torch.Tensor:
        """A diffusers backend call: ``(B, L, heads, D)`` tensors, maybe under context parallelism."""
        if return_lse:
            raise NotImplementedError("NYI: sparsevid attention returning log-sum-exp (return_lse=True)")
        context = getattr(_parallel_config, "context_parallel_config", None)
        if context is None:
            out = self.attend(*(t.transpose(1, 2) for t in (query, key, value)), attn_mask=attn_mask,
                              dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
            return out.transpose(1, 2)
        session, ulysses = self.session, context.ulysses_degree or 1
        # Head balance: permute whole heads before the Ulysses split (every rank alike) and back after it
        slot = (self.layer, self.calls)
        order = (session.head_balance.order(slot, session.step, session.config.replan_interval)
                 if session.config.head_balance and ulysses > 1 else None)
        if order is not None:
            query, key, value = (t.index_select(2, order) for t in (query, key, value))
        if (context.ring_degree or 1) > 1:
            out = self._ring(query, key, value, attn_mask, scale, context)
        else:
            out = self._ulysses(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _parallel_config)
        if session.config.head_balance and ulysses > 1:
            self._propose_order(slot, order, context)
        if order is not None:
            out = out.index_select(2, torch.argsort(order))
        return out

    def _ulysses(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, parallel_config):
        """After diffusers' all-to-all every rank holds the whole sequence for its heads, so it plans them
        exactly as one GPU would (the step and layer decisions are equal on every rank)."""
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        def forward_op(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                       return_lse=False, _save_ctx=True, _parallel_config=None):
            return self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                               dropout_p=dropout_p, is_causal=is_causal, scale=scale).transpose(1, 2)

        def backward_op(*args, **kwargs):
            raise NotImplementedError("NYI: backward of sparsevid attention under context parallelism")

        return _templated_context_parallel_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
            forward_op=forward_op, backward_op=backward_op, _parallel_config=parallel_config,
        )

    def _ring(self, query, key, value, attn_mask, scale, context):
        """Ring (and hybrid Ulysses x ring) attention with diffusers' meshes: under hybrid, diffusers'
        all-to-all over the Ulysses group first gives every rank its ring chunk for its heads (as its
        unified template does); then :meth:`SparseSession.attend_ring` over the ring group."""
        if context.ring_anything:
            raise NotImplementedError("NYI: sparsevid under ring_anything (unequal chunks); use equal chunks "
                                      "(a sequence length divisible by the ring degree)")
        if attn_mask is not None:
            raise NotImplementedError("NYI: sparsevid under ring attention with an attention mask")
        from diffusers.models.attention_dispatch import SeqAllToAllDim

        from ..parallel.ring import RingGroup

        ulysses = context._ulysses_mesh.get_group() if context.ulysses_degree > 1 else None
        if ulysses is not None:  # (B, L/(R*U), H, D) -> (B, L/R, H/U, D)
            query, key, value = (SeqAllToAllDim.apply(ulysses, t, 2, 1) for t in (query, key, value))
        ring = RingGroup(context._ring_local_rank, context.ring_degree, context._ring_mesh.get_group())
        out = self.session.attend_ring(*(t.transpose(1, 2) for t in (query, key, value)), layer=self.layer,
                                       call=self.calls, ring=ring, scale=scale).transpose(1, 2)
        self.calls += 1
        return SeqAllToAllDim.apply(ulysses, out, 1, 2) if ulysses is not None else out

    def _propose_order(self, slot, applied, context) -> None:
        """Every Ulysses rank's per-head cost of the plan just made (one all-gather) -> the next order."""
        from ..parallel.ring import all_gather

        local = self.session.head_balance.take_recorded(slot)
        if local is None:  # no new plan this call
            return
        costs = all_gather(local, context._ulysses_mesh.get_group(), context.ulysses_degree)
        self.session.head_balance.propose(slot, costs, applied, context.ulysses_degree)


class _Active(threading.local):
    """Per thread, the sparse layer forwards running in it (innermost last): a model in another thread
    is never routed to this one's session."""

    def __init__(self):
        self.stack: list[_SparseForward] = []


_ACTIVE = _Active()


class _DispatchRoutes:
    """The wrappers around diffusers' registered attention backends, installed while any transformer
    has sparsevid applied (a transformer dropped without ``remove`` stops counting when collected)."""

    users: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()

    @staticmethod
    def registry():
        import diffusers
        from diffusers.models import attention_dispatch

        backends = getattr(getattr(attention_dispatch, "_AttentionBackendRegistry", None), "_backends", None)
        if not isinstance(backends, dict) or not hasattr(attention_dispatch, "dispatch_attention_fn"):
            raise RuntimeError(
                f"sparsevid routes attention through diffusers' _AttentionBackendRegistry._backends (tested with "
                f"diffusers {', '.join(TESTED_DIFFUSERS)}); diffusers {diffusers.__version__} has none"
            )
        return backends

    @classmethod
    def acquire(cls, transformer: torch.nn.Module) -> None:
        backends = cls.registry()
        for name, fn in list(backends.items()):
            if not hasattr(fn, "_sparsevid_native"):
                backends[name] = _routed(fn)
        cls.users.add(transformer)

    @classmethod
    def release(cls, transformer: torch.nn.Module) -> None:
        cls.users.discard(transformer)
        if not cls.users:
            backends = cls.registry()
            for name, fn in list(backends.items()):
                backends[name] = getattr(fn, "_sparsevid_native", fn)


def _routed(native):
    def backend(*args, **kwargs):
        if _ACTIVE.stack:
            return _ACTIVE.stack[-1].attend_dispatched(*args, **kwargs)
        return native(*args, **kwargs)

    backend._sparsevid_native = native
    backend.__name__ = getattr(native, "__name__", "backend")
    backend.__doc__ = native.__doc__
    return backend


# ---------------------------------------------------------------------------------------- hooks
class _StateHook(ModelHook):
    """Around every transformer forward: bind the call, tell the session the grid, the timestep (and
    the step and step count where the pipeline's ``cache_context`` gives them), and whether the video
    tokens travel in tile order this time; then tell it the forward ended, or failed."""

    _is_stateful = True

    def __init__(self, session: SparseSession, owner: int, tile_order: "_TileOrder | None" = None):
        super().__init__()
        self.session = session
        self.owner = owner
        self.tile_order = tile_order
        self.context = StateManager(BaseState)  # diffusers' cache_context sets its CacheContext here

    # Traced under torch.compile (the transformer's forward inside it compiles); only _begin/_end run eagerly.
    def new_forward(self, module, *args, **kwargs):
        self._begin(module, args, kwargs)
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self._end(failed=True)
            raise
        self._end()
        return out

    @torch.compiler.disable  # host-side bookkeeping; runs eagerly under torch.compile
    def _end(self, failed: bool = False) -> None:
        self.session.end_forward(failed)

    @torch.compiler.disable
    def _begin(self, module, args, kwargs) -> None:
        session, spec = self.session, self.session.spec
        call = bind_call(module, args, kwargs)
        reason = spec.refuse_call(call) if spec.refuse_call is not None else None
        if reason is not None and session.config.method is not None:
            raise NotImplementedError(f"NYI: sparsevid on this {type(module).__name__} call: {reason}")
        context = self.context._context  # None outside a cache_context
        step, steps = getattr(context, "step_index", None), getattr(context, "num_inference_steps", None)
        session.begin_forward(spec.grid(module, call), call.get(spec.timestep), step=step, steps=steps)
        # tile order only in a forward where some layer runs sparse (dense steps stay exactly native), and
        # not under context parallelism, whose hooks split the sequence (and the rotary tables) by position
        # nor with a step cache: it compares and replays activations across steps, dense and sparse alike
        session.tiled = (self.tile_order is not None and spec.tile_order_call(call)
                         and getattr(module, "_parallel_config", None) is None
                         and not getattr(module, "is_cache_enabled", False)
                         and session.runs_sparse(self.tile_order.last_layer))

    def reset_state(self, module):
        self.session.reset()
        return module


class _AttentionHook(ModelHook):
    """Around one video self-attention module: native when dense, routed to the session when sparse."""

    def __init__(self, session: SparseSession, layer: int, owner: int):
        super().__init__()
        self.session = session
        self.layer = layer
        self.owner = owner

    # Eager under torch.compile: per-step decisions and planning are host-side work; the rest of the
    # transformer (MLPs, norms, cross-attention) still compiles.
    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        session = self.session
        if not session.runs_sparse(self.layer):
            session.dense_calls += 1
            return self.fn_ref.original_forward(*args, **kwargs)
        target = _SparseForward(session, self.layer, module)
        _ACTIVE.stack.append(target)
        try:
            if _uses_dispatch(module):
                out = self.fn_ref.original_forward(*args, **kwargs)
            else:
                with SdpaRoute(lambda sdpa, args, kwargs: target.attend(*args, **kwargs)):
                    out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            _ACTIVE.stack.pop()
        if target.calls == 0:
            processor = type(getattr(module, "processor", module)).__name__
            raise RuntimeError(
                f"sparsevid: self-attention layer {self.layer} ({processor}) made no attention call sparsevid could "
                "route (neither diffusers' dispatch_attention_fn nor F.scaled_dot_product_attention); sparse "
                "attention would silently not run. Call sparsevid.remove and report the model class."
            )
        return out


class _TileOrder:
    """Forward hooks that carry a model's video tokens in tile order from the patch embedding to the
    output projection (``ModelSpec.tile_order``), so that no attention call gathers: every token-wise
    layer is indifferent to the order, self-attention sees its rotary tables permuted alike, and the
    output projection's result goes back to raster order before the model unpatchifies it."""

    def __init__(self, session: SparseSession, points, last_layer: int):
        self.session = session
        self.last_layer = last_layer  # the deepest self-attention layer: sparse if any layer is
        self.handles = [
            points.embed.register_forward_hook(self._embed),
            points.positions.register_forward_hook(self._positions),
            points.out.register_forward_hook(self._restore),
        ]

    def _tables(self, device):
        return self.session.raster_layout().on(device)

    # Eager under torch.compile like the attention hooks: the tables are built on first use, and
    # torch 2.13's CPU inductor miscompiles their integer divisions.
    @torch.compiler.disable
    def _embed(self, module, args, out):  # (B, C, F, H, W) -> (B, C, 1, 1, L) in tile order
        if not self.session.tiled:
            return out
        order = self._tables(out.device).perm[: math.prod(out.shape[2:])]
        return out.flatten(2).index_select(2, order).view(*out.shape[:2], 1, 1, -1)

    @torch.compiler.disable
    def _positions(self, module, args, out):  # per-token tables (1, L, 1, D)
        if not self.session.tiled:
            return out
        order = self._tables(out[0].device).perm[: out[0].shape[1]]
        return tuple(t.index_select(1, order) for t in out)

    @torch.compiler.disable
    def _restore(self, module, args, out):  # (B, L, C) back to raster order
        if not self.session.tiled:
            return out
        return out.index_select(1, self._tables(out.device).inverse_perm)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _uses_dispatch(module: torch.nn.Module) -> bool:
    """diffusers processors that go through ``dispatch_attention_fn`` carry an ``_attention_backend``."""
    return hasattr(getattr(module, "processor", None), "_attention_backend")


# ---------------------------------------------------------------------------------------- public
_OWNERS = itertools.count(1)


class SparseVidHandle(Handle):
    """What :func:`apply` returns: ``.remove()`` restores native behaviour; ``.stats()`` reports (the
    last counts stay readable after ``remove()``)."""

    def __init__(self, transformers: list[torch.nn.Module], sessions: list[SparseSession], config: SparseVidConfig,
                 owner: int, reuse_handles: list | None = None):
        self.transformers = transformers
        self.sessions = sessions
        self.config = config
        self.owner = owner
        self.reuse_handles = reuse_handles or []

    def _stats(self) -> dict:
        """Counts so far: ``sparse_calls`` (attention calls sparsevid computed, one per call whatever its
        batch), ``dense_calls`` (hooked layers left native: dense layers and steps), ``plans`` made and their
        ``mean_density``, the ``budget`` the planner spends (e.g. ``"mass=0.9 (xattn's default)"``), the
        ``tail`` method, ``replan_every`` (the planner's default where ``None`` was asked) and the
        ``backends`` that computed the sparse calls (``auto`` resolved); with
        ``reuse=``, ``"reuse"`` holds one ``ReuseHandle.stats()`` per transformer."""
        per = [s.stats() for s in self.sessions]
        plans = sum(p["plans"] for p in per)
        mean = sum(p["mean_density"] * p["plans"] for p in per if p["plans"]) / plans if plans else None
        out = dict(sparse_calls=sum(p["sparse_calls"] for p in per), dense_calls=sum(p["dense_calls"] for p in per),
                   plans=plans, mean_density=mean, budget=describe_budget(self.config), tail=self.config.tail,
                   replan_every=self.config.replan_interval,
                   backends=sorted({name for p in per for name in p["backends"]}))
        reuse = [h.stats() for h in self.reuse_handles]
        if reuse:
            out["reuse"] = reuse
        return out

    def __repr__(self) -> str:
        c = self.config
        steps = c.dense_steps if c.dense_steps is not None else f"{DEFAULT_DENSE_STEP_FRACTION:.0%}"
        where = ", ".join(s.name for s in self.sessions) + ("" if self.transformers else ", removed")
        extra = "".join(f", {name}={getattr(c, name)!r}" for name in ("quant", "tail") if getattr(c, name) is not None)
        return (f"SparseVidHandle({where}: method={c.method!r}, budget={describe_budget(c)}, "
                f"dense_layers={c.dense_layers}, dense_steps={steps}, backend={c.backend!r}{extra})")

    def reset(self) -> None:
        """Forget cached plans and the step counter (a new generation with a bare transformer)."""
        for s in self.sessions:
            s.reset()

    def _remove(self) -> None:
        """Undo :func:`apply` (a no-op where this handle's hooks are already gone, e.g. after
        ``sparsevid.remove`` and a newer ``apply``: those newer hooks stay)."""
        for transformer in self.transformers:
            _remove(transformer, owner=self.owner)
        self.transformers = []


def _transformers_of(target) -> tuple[list[torch.nn.Module], Any]:
    """The target's transformers, and a callable returning its scheduler now (``None``: a bare transformer)."""
    if isinstance(target, torch.nn.Module):
        return [target], None
    found = [getattr(target, name, None) for name in ("transformer", "transformer_2")]
    found = [t for t in found if isinstance(t, torch.nn.Module)]
    if not found:
        raise TypeError(
            f"Expect a diffusers pipeline (with .transformer) or a transformer model but got {type(target).__name__}"
        )
    if getattr(target, "scheduler", None) is None:
        return found, None
    try:  # the pipeline's attribute, read at each forward: a scheduler swapped after apply is the one followed
        pipe = weakref.ref(target)
    except TypeError:  # a pipeline-like object without weak references
        pipe = lambda: target  # noqa: E731
    return found, lambda: getattr(pipe(), "scheduler", None)


def apply(
    target,
    method: str | None = "draft",
    density: float | None = None,
    *,
    mass: float | None = None,
    dense_steps: int | float | None = None,
    dense_layers: int = 1,
    replan_every: int | None = None,
    backend: str = "auto",
    reuse=None,
    tile_order: bool | None = None,
    quant: str | None = None,
    tail: str | None = "auto",
    head_balance: bool = False,
    preset: str | None = None,
    **planner_options,
) -> SparseVidHandle:
    """Make ``target``'s video self-attention sparse. See :class:`SparseVidConfig` for the options.

    Args:
        target: a diffusers pipeline (its ``transformer`` and, for Wan2.2, ``transformer_2``) or a
            transformer model of a class in :func:`supported_models`.
        method (str | None): planner name; ``None`` leaves attention native (``reuse`` only).
        reuse: temporal reuse on top (see :mod:`sparsevid.reuse`): ``None``, a
            ``sparsevid.reuse.TokenReplay`` (FFN replay across adjacent frames, Wan family), a diffusers
            step-cache config (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``, ``MagCacheConfig``,
            ... attached with ``transformer.enable_cache``), or a list with at most one of each.
        tile_order (bool | None): keep the video tokens in tile order through the transformer so that
            attention calls gather nothing (``None``: where the model's registry entry allows it,
            without token replay, which needs raster order). Outputs are the same either way.
        quant (str | None): 8-bit attention (``"int8"``, ``"fp8"``) for the layers and steps that run
            sparse; dense layers and steps keep the user's attention backend. ``method="dense",
            quant="int8"`` asks for quantized dense attention (a full plan through the 8-bit kernel;
            add ``dense_layers=0, dense_steps=0`` for every layer and step). Forward only.
        tail (str | None): what the keys a plan skips contribute: ``"auto"`` (default) the plan type's
            default: nothing for block and token plans, the cluster tail ``"centroid"`` for
            ``method="clustered"``; ``None`` drops them; ``"pooled-var"`` keeps each skipped block as a
            summary term in the same softmax (:mod:`sparsevid.tail`). Refused with ``quant=`` and token plans.
        head_balance (bool): under diffusers' Ulysses (or hybrid) context parallelism, deal the heads to
            the ranks by the computed entries of their last plans (:mod:`sparsevid.parallel.head_balance`), so
            that ranks finish together; the output is the same. Refused for planners whose plan of a
            head depends on other heads (``random``, ``budget="layer"``).
        preset (str | None): a named point of the measured quality-vs-speed frontier
            (``sparsevid.config.NAMED_SETTINGS``): ``"fast"`` (``draft`` at density 0.1, the same as no
            options) or ``"balanced"`` (``draft`` at density 0.25). It sets those fields; passing one of
            them too, at another value than its default, is refused.

    Returns:
        SparseVidHandle; ``handle.remove()`` (or :func:`remove`) restores native behaviour exactly.

    Raises:
        TypeError / ValueError: an unsupported or refused model (the message says why), or any bad
        setting (checked here, with one planner run on a tiny input, before anything is hooked).
    """
    from ..reuse import split_reuse

    transformers, scheduler = _transformers_of(target)
    for transformer in transformers:
        compiled = getattr(transformer, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(compiled, torch.nn.Module):
            raise TypeError(f"Expect the model itself but got torch.compile's wrapper of a {type(compiled).__name__}; "
                            "call sparsevid.apply on the model first, then torch.compile it (its hooks compile too)")
    settings = dict(method=method, density=density, mass=mass, dense_steps=dense_steps, dense_layers=dense_layers,
                    replan_every=replan_every, backend=backend, planner_options=dict(planner_options),
                    tile_order=tile_order, quant=quant, tail=tail, head_balance=head_balance)
    config = SparseVidConfig.named(preset, **settings)
    device = next((p.device for p in transformers[0].parameters()), None) if transformers else None
    # a bare transformer's steps come from the cache_context diffusers pipelines call it in
    has_schedule = scheduler is not None or all(hasattr(t, "cache_context") for t in transformers)
    specs = []
    for transformer in transformers:
        spec = model_spec(transformer)
        name = type(transformer).__name__
        config.validate(has_schedule=has_schedule, device=device, layers=len(spec.self_attention(transformer)),
                        model=name, ring=_ring_degree(transformer) > 1, text_tokens=spec.others is not None)
        specs.append(spec)
    token_replay, step_cache = split_reuse(reuse)  # TypeError / ValueError naming reuse, before any hook
    for transformer, spec in zip(transformers, specs):
        name = type(transformer).__name__
        if _state_hook(transformer) is not None:
            raise ValueError(f"Expect a model without sparsevid applied but {name} has it; call sparsevid.remove first")
        if step_cache is not None and getattr(transformer, "is_cache_enabled", False):
            raise ValueError(f"Expect reuse with a step cache on a model without one but {name} has a cache enabled; "
                             "call transformer.disable_cache() first")
        if token_replay is not None and spec.replay is None:
            raise NotImplementedError(f"NYI: reuse=TokenReplay for {name}")
        if tile_order and (spec.tile_order is None or token_replay is not None or step_cache is not None):
            raise ValueError(f"Expect tile_order=None or False for {name}: "
                             + ("its registry entry has no tile-order points" if spec.tile_order is None
                                else "token replay and step caches need one token order across steps"))
    if config.method is not None:
        _DispatchRoutes.registry()  # an incompatible diffusers is refused before anything is hooked
    owner = next(_OWNERS)
    sessions = []
    for transformer, spec in zip(transformers, specs):
        session = SparseSession(config, spec, scheduler, type(transformer).__name__)
        ordered = None
        if (config.method is not None and tile_order is not False and spec.tile_order is not None
                and token_replay is None and step_cache is None):
            ordered = _TileOrder(session, spec.tile_order(transformer), len(spec.self_attention(transformer)) - 1)
        _hook(transformer, _StateHook(session, owner, ordered), _STATE_HOOK)
        for layer, module in enumerate(spec.self_attention(transformer) if config.method is not None else []):
            _hook(module, _AttentionHook(session, layer, owner), _ATTENTION_HOOK)
        if config.method is not None:
            _DispatchRoutes.acquire(transformer)
        sessions.append(session)
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
                _remove(transformer)
            raise
    return SparseVidHandle(transformers, sessions, config, owner, reuse_handles)


def _ring_degree(transformer: torch.nn.Module) -> int:
    """The ring degree of the context parallelism ``enable_parallelism`` set on ``transformer`` (1: none)."""
    context = getattr(getattr(transformer, "_parallel_config", None), "context_parallel_config", None)
    return getattr(context, "ring_degree", None) or 1


def _hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    hook.installed_forward = module.forward  # what a hook added later on top of ours wraps (see _unhook)


def _unhook(module: torch.nn.Module, name: str) -> None:
    """Remove our hook ``name``, keeping an accelerate hook added on top of it (``enable_model_cpu_offload``
    after ``apply``): diffusers would write the forward below ours over accelerate's wrapper."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(name) if registry is not None else None
    if hook is None:
        return
    outer = module.__dict__.get("forward")
    covered = outer is not hook.installed_forward and module.__dict__.get("_old_forward") is hook.installed_forward
    registry.remove_hook(name, recurse=False)
    if covered:  # accelerate's wrapper calls module._old_forward: point it at what ours wrapped
        module._old_forward, module.forward = module.forward, outer


def _state_hook(transformer: torch.nn.Module) -> _StateHook | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry.get_hook(_STATE_HOOK) if registry is not None else None


def _remove(transformer: torch.nn.Module, owner: int | None = None) -> None:
    """Remove sparsevid from one transformer: all of it, or only what handle ``owner`` put there."""
    state = _state_hook(transformer)
    if state is None or (owner is not None and state.owner != owner):
        return
    reuse = transformer.__dict__.pop("_sparsevid_reuse", None)
    if reuse is not None:
        reuse.remove()
    if state.tile_order is not None:
        state.tile_order.remove()
    for module in state.session.spec.self_attention(transformer):
        _unhook(module, _ATTENTION_HOOK)
    _unhook(transformer, _STATE_HOOK)
    _DispatchRoutes.release(transformer)
    state.session.release()  # diffusers' removed hooks sit in reference cycles until a gc pass


def remove(target) -> None:
    """Remove sparsevid from a pipeline or transformer (no-op where it is not applied)."""
    for transformer in _transformers_of(target)[0]:
        _remove(transformer)
