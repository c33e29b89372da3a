"""Temporal feature reuse for video DiTs: token replay and step caches.

(FastCar MLP replay for autoregressive decoders is the decoder product, :mod:`sparsevid.decoder`.)

- :mod:`sparsevid.reuse.dit`: :class:`TokenReplay`, FFN replay across adjacent frames inside one
  video-DiT forward.
- :mod:`sparsevid.reuse.steps`: diffusers' step caches (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``,
  ``MagCacheConfig``, ...), passed through.
- :mod:`sparsevid.reuse.spec`: :func:`parse_reuse`, the command lines' ``--reuse SPEC`` strings.

With sparse attention, one call (the ``reuse=`` argument of :func:`sparsevid.apply`)::

    from diffusers.hooks import FirstBlockCacheConfig
    handle = sv.apply(pipe, method="draft", density=0.1,
                      reuse=[sv.reuse.TokenReplay(rate=0.3), FirstBlockCacheConfig(threshold=0.05)])
    handle.stats()["reuse"]   # token-replay rates per block
    handle.remove()           # sparse attention, token replay and the step cache all removed

``reuse`` accepts ``None``, one :class:`TokenReplay`, one diffusers cache config, or a list/tuple
with at most one of each. :func:`apply` is the same on a bare transformer without sparse attention.
"""

from __future__ import annotations

import torch

from ..integrations.core import Handle
from . import dit, spec, steps
from .dit import TokenReplay, TokenReplayHandle, apply_token_replay
from .spec import parse_reuse
from .steps import cache_context, enable_step_cache, is_step_cache

__all__ = [
    "ReuseHandle",
    "TokenReplay",
    "TokenReplayHandle",
    "apply",
    "apply_token_replay",
    "cache_context",
    "dit",
    "enable_step_cache",
    "is_step_cache",
    "parse_reuse",
    "spec",
    "split_reuse",
    "steps",
]


def split_reuse(reuse) -> tuple[TokenReplay | None, object | None]:
    """Validate a ``reuse=`` value and split it into (token replay, step-cache config).

    Raises:
        TypeError: an element that is neither a TokenReplay nor a diffusers cache config.
        ValueError: two token replays or two step caches.
    """
    if reuse is None:
        return None, None
    items = list(reuse) if isinstance(reuse, (list, tuple)) else [reuse]
    token, step = None, None
    for item in items:
        if isinstance(item, TokenReplay):
            if token is not None:
                raise ValueError("Expect at most one TokenReplay in reuse but got two")
            token = item
        elif is_step_cache(item):
            if step is not None:
                raise ValueError("Expect at most one diffusers step cache config in reuse but got two")
            step = item
        else:
            raise TypeError(
                "Expect reuse to be None, a sparsevid.reuse.TokenReplay, a diffusers cache config "
                f"(e.g. FirstBlockCacheConfig) or a list of them but got {type(item).__name__}"
            )
    return token, step


class ReuseHandle(Handle):
    """Token replay and/or a step cache on one transformer; ``remove()`` undoes both."""

    def __init__(self, transformer, token: TokenReplayHandle | None, disable_step_cache, step_config):
        self.transformer = transformer
        self.token = token
        self.step_config = step_config
        self._disable_step_cache = disable_step_cache

    def _stats(self) -> dict:
        return dict(token_replay=self.token.stats() if self.token else None,
                    step_cache=type(self.step_config).__name__ if self.step_config is not None else None)

    def reset_stats(self) -> None:
        if self.token:
            self.token.reset_stats()

    def _remove(self) -> None:
        if self.token is not None:
            self.token.remove()
        if self._disable_step_cache is not None:
            self._disable_step_cache()


def apply(transformer: torch.nn.Module, reuse) -> ReuseHandle:
    """Attach ``reuse`` (see :func:`split_reuse`) to one diffusers transformer."""
    token, step = split_reuse(reuse)
    disable = enable_step_cache(transformer, step) if step is not None else None
    try:
        token_handle = apply_token_replay(transformer, token) if token is not None else None
    except Exception:
        if disable is not None:
            disable()
        raise
    return ReuseHandle(transformer, token_handle, disable, step)
