"""The ComfyUI adapter: sparse attention for ComfyUI's own video models, over the same core as diffusers.

ComfyUI routes every attention call of its models through
``transformer_options["optimized_attention_override"](func, q, k, v, heads=..., ...)`` when that
key is set, where ``func`` is the attention the user runs (Sage, flash, PyTorch). The override alone
sees neither the token grid, nor the layer, nor the step, and cross-attention calls it too, so
:func:`apply` adds two things to a *clone* of the user's ``ModelPatcher`` (the input model is never
changed, ComfyUI's convention):

- a ``DIFFUSION_MODEL`` wrapper (``comfy.patcher_extension.WrappersMP``) that binds each forward call
  of the diffusion model, reads the token grid from ``x`` and the model's patch size (registry:
  :mod:`sparsevid.integrations.models`, ComfyUI entries) and the step from the sampler's sigmas
  (``transformer_options["sample_sigmas"]`` and ``["sigmas"]``: one host read per forward), and for
  the length of that forward only puts forward hooks on the registry's video self-attention modules,
  so it knows which layer runs (the model itself is left as it was);
- the override: the first call inside a video self-attention module whose keys are its queries is
  that layer's self-attention; it runs sparse (:meth:`SparseSession.attend`) when its layer and step
  do, and everything else — dense layers, warm-up steps, cross-attention (whatever the text length),
  text-only attention — calls ``func`` untouched (or an override another node set before).

Never a silent no-op: a sparse layer whose forward made no call through the override raises, naming
the model class. One SparseVid patch per model: a second one (two nodes in a row) is refused.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..config import SparseVidConfig
from .core import SparseSession
from .models import bind_call, model_spec

__all__ = ["apply", "sparse_session"]

_KEY = "sparsevid"  # the wrapper key, and where the session sits in transformer_options


class _SigmaSchedule(SimpleNamespace):
    """What :class:`SparseSession` reads of a scheduler, from the sampler's sigmas: ``timesteps`` is one
    object per sampling run (the session starts a new generation when it changes)."""

    def __init__(self):
        super().__init__(step_index=None, timesteps=None, sigmas=None)

    def update(self, options: dict) -> None:
        sigmas, sigma = options.get("sample_sigmas"), options.get("sigmas")
        if sigmas is None or sigma is None:  # called outside a sampler: no schedule
            self.step_index, self.timesteps, self.sigmas = None, None, None
            return
        if sigmas is not self.sigmas:  # the sampler sets them once per run
            self.sigmas, self.timesteps = sigmas, sigmas[:-1]  # the last sigma (0) is the end, not a step
        self.step_index = int((sigmas.float() - sigma.flatten()[0].float()).abs().argmin())


class _ComfySparse:
    """The wrapper and the override of one patched model, sharing one session."""

    def __init__(self, session: SparseSession, schedule: _SigmaSchedule, previous_override=None):
        self.session = session
        self.schedule = schedule
        self.previous = previous_override
        self.layer: int | None = None  # the video self-attention layer whose forward runs now
        self.routed = 0  # its calls through the override so far
        self.calls: list[int] = []  # per layer, its forwards in this model forward (a VACE block may run twice)

    def __deepcopy__(self, memo):
        # ModelPatcher.clone deep-copies model_options (where the override sits) but not the wrappers:
        # every clone of a patched model shares this one state, so the two halves stay one patch
        return self

    def wrapper(self, executor, *args, **kwargs):
        model = executor.class_obj
        call = bind_call(model, args, kwargs)
        spec = self.session.spec
        self.schedule.update(call.get("transformer_options") or {})
        modules = spec.self_attention(model)
        self.session.begin_forward(spec.grid(model, call), call.get(spec.timestep))
        hooks = []
        try:
            self.calls = [0] * len(modules)
            for layer, module in enumerate(modules):
                hooks.append(module.register_forward_pre_hook(lambda m, a, layer=layer: self._enter(layer)))
                hooks.append(module.register_forward_hook(lambda m, a, o, layer=layer: self._leave(model, layer)))
            out = executor(*args, **kwargs)
        except BaseException:
            self.session.end_forward(failed=True)
            raise
        finally:
            for hook in hooks:
                hook.remove()
            self.layer = None
        self.session.end_forward()
        return out

    def _enter(self, layer: int) -> None:
        self.layer, self.routed = layer, 0

    def _leave(self, model, layer: int) -> None:
        self.layer = None
        if not self.routed and self.session.runs_sparse(layer):
            raise RuntimeError(
                f"sparsevid: video self-attention layer {layer} of {type(model).__name__} made no attention call "
                "through ComfyUI's optimized_attention_override; it would silently stay dense (a block patch that "
                "drops transformer_options?)"
            )

    def override(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        dense = self.previous

        def native():
            if dense is not None:
                return dense(func, q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                             skip_output_reshape=skip_output_reshape, **kwargs)
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)

        length, keys = (q.shape[-2], k.shape[-2]) if skip_reshape else (q.shape[1], k.shape[1])
        layer = self.layer
        if layer is None or self.routed or length != keys:
            return native()  # outside a video self-attention module, or not its self-attention call
        self.routed += 1
        call = self.calls[layer]
        self.calls[layer] += 1
        if not self.session.runs_sparse(layer):
            self.session.dense_calls += 1
            return native()
        if skip_reshape:  # (B, heads, L, D)
            qh, kh, vh = q, k, v
        else:  # (B, L, heads * D)
            B, L, C = q.shape
            qh, kh, vh = (t.view(B, L, heads, C // heads).transpose(1, 2) for t in (q, k, v))
        if mask is not None and mask.dim() == 3:  # (B, 1, L) key mask
            mask = mask[:, None]
        out = self.session.attend(qh, kh, vh, layer=layer, call=call, attn_mask=mask)
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def apply(
    model,
    method: str | None = "draft",
    density: float | None = None,
    *,
    mass: float | None = None,
    dense_steps: int | float | None = None,
    dense_layers: int = 1,
    replan_every: int | None = None,
    backend: str = "auto",
    quant: str | None = None,
    tail: str | None = "auto",
    preset: str | None = None,
    **planner_options,
):
    """A clone of ComfyUI ``ModelPatcher`` ``model`` whose video self-attention runs sparse.

    Args:
        model: ComfyUI's ``MODEL`` (a ``comfy.model_patcher.ModelPatcher``); it is not changed.
        method, density, mass, dense_layers, replan_every, backend, quant, tail, preset, planner_options: as
            :func:`sparsevid.apply` (:class:`~sparsevid.integrations.core.SparseVidConfig`).
        dense_steps (int | float | None): leading sampling steps run dense: a fraction of the sampler's
            steps, or an int count; ``None``: as :func:`sparsevid.apply` (20% of the sampler's steps).

    Returns:
        The patched clone.

    Raises:
        ValueError / TypeError: an unsupported model class (with the supported ones), a model another
        SparseVid node patched already, or any bad setting.
    """
    import comfy.patcher_extension

    diffusion_model = model.model.diffusion_model
    spec = model_spec(diffusion_model, framework="comfyui")
    if sparse_session(model) is not None:
        raise ValueError("Expect a MODEL no SparseVid Attention node patched yet but got one that is (two SparseVid "
                         "nodes in a row); keep one node and set its options there")
    settings = dict(method=method, density=density, mass=mass, dense_steps=dense_steps, dense_layers=dense_layers,
                    replan_every=replan_every, backend=backend, planner_options=dict(planner_options), quant=quant,
                    tail=tail)
    config = SparseVidConfig.named(preset, **settings)
    config.validate(device=model.load_device, layers=len(spec.self_attention(diffusion_model)),
                    model=type(diffusion_model).__name__)
    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    schedule = _SigmaSchedule()
    sparse = _ComfySparse(SparseSession(config, spec, lambda: schedule, type(diffusion_model).__name__), schedule,
                          options.get("optimized_attention_override"))
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, _KEY, sparse.wrapper)
    options["optimized_attention_override"] = sparse.override
    options[_KEY] = sparse
    return clone


def sparse_session(model) -> SparseSession | None:
    """The session of a model :func:`apply` patched (its ``stats()``), or ``None``."""
    sparse = model.model_options.get("transformer_options", {}).get(_KEY)
    return sparse.session if sparse is not None else None
