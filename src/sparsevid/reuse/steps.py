"""Step-level reuse across denoising steps: diffusers' own cache hooks, composed, not rewritten.

diffusers 0.42 ships step caches as ``@dataclass`` configs that ``transformer.enable_cache(config)``
attaches as hooks (``CacheMixin``) and ``transformer.disable_cache()`` removes:

===========================  =====================================================================
config                       what it skips
===========================  =====================================================================
``FirstBlockCacheConfig``    all blocks after the first while the first block's residual changes
                             less than ``threshold`` (relative) since the last full step
``TaylorSeerCacheConfig``    attention/FFN outputs predicted by a Taylor series between full steps
                             every ``cache_interval`` steps. Its default module identifiers match
                             no Wan module (diffusers 0.42.1); ``use_lite_mode=True`` (predict the
                             output, skip every block) or ``cache_identifiers`` make it act
``MagCacheConfig``           blocks skipped while the accumulated magnitude-ratio error stays under
                             ``threshold``; needs ``mag_ratios`` calibrated for the checkpoint
                             (``calibrate=True``) and ``num_inference_steps``
``PyramidAttentionBroadcastConfig``, ``FasterCacheConfig``, ``SeaCacheConfig``: also accepted
===========================  =====================================================================

sparsevid passes any of these through ``sparsevid.apply(target, ..., reuse=config)`` (alone or in
a list with :class:`sparsevid.reuse.TokenReplay`): sparse attention hooks sit on the self-attention
modules, the cache hooks on the blocks, so they compose; ``handle.remove()`` disables the cache it
enabled. The caches keep per-branch state in a *cache context*: pipelines open
``transformer.cache_context("cond")`` around each guidance branch; a hand-written loop must do the
same (:func:`cache_context` does it for any model, a no-op for models without ``CacheMixin``).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["cache_context", "enable_step_cache", "is_step_cache", "step_cache_types"]


def step_cache_types() -> tuple[type, ...]:
    """The diffusers cache config classes that ``enable_cache`` accepts (those this diffusers has)."""
    import diffusers.hooks as hooks

    names = ("FirstBlockCacheConfig", "TaylorSeerCacheConfig", "MagCacheConfig", "PyramidAttentionBroadcastConfig",
             "FasterCacheConfig", "SeaCacheConfig")
    return tuple(getattr(hooks, n) for n in names if hasattr(hooks, n))


def is_step_cache(obj) -> bool:
    """Whether ``obj`` is a diffusers step-cache config instance."""
    try:
        return isinstance(obj, step_cache_types())
    except ImportError:
        return False


def enable_step_cache(transformer: torch.nn.Module, config):
    """``transformer.enable_cache(config)``; returns the undo (``disable_cache``).

    Raises:
        TypeError: ``config`` is not a diffusers cache config, or the model has no ``enable_cache``.
        ValueError: a cache is already enabled on the model, or the config hooked none of its modules.
    """
    if not is_step_cache(config):
        raise TypeError(
            f"Expect a diffusers cache config ({[t.__name__ for t in step_cache_types()]}) but got {type(config).__name__}"
        )
    if not hasattr(transformer, "enable_cache"):
        raise TypeError(f"Expect a diffusers model with CacheMixin.enable_cache but got {type(transformer).__name__}")
    if getattr(transformer, "is_cache_enabled", False):
        raise ValueError(
            f"Expect {type(transformer).__name__} without a cache enabled but it has one; call disable_cache() first"
        )
    before = _hook_count(transformer)
    transformer.enable_cache(config)
    if _hook_count(transformer) == before:
        # e.g. TaylorSeer's default identifiers ("^blocks.*attn") fullmatch no Wan module ("attn1"):
        # enable_cache succeeds and every step still runs in full
        transformer.disable_cache()
        raise ValueError(
            f"Expect {type(config).__name__} to hook some module of {type(transformer).__name__} but it matched none "
            "(for TaylorSeer pass use_lite_mode=True or cache_identifiers=[...] naming its modules)"
        )
    return transformer.disable_cache


def _hook_count(model: torch.nn.Module) -> int:
    """diffusers hooks registered on ``model`` and its submodules."""
    return sum(len(m._diffusers_hook.hooks) for m in model.modules() if hasattr(m, "_diffusers_hook"))


@contextlib.contextmanager
def cache_context(model: torch.nn.Module, name: str):
    """``model.cache_context(name)`` when the model has it (diffusers ``CacheMixin``), else nothing."""
    ctx = getattr(model, "cache_context", None)
    with (ctx(name) if callable(ctx) else contextlib.nullcontext()):
        yield
