"""What FastCar's two decoders share: the Llama-family anatomy, RoPE's rotation and the per-layer thresholds.

:mod:`sparsevid.decoder.fastcar` (``transformers`` hooks) and :mod:`sparsevid.decoder.fastcar_graph`
(the static-cache decoder) both import from here, so neither imports the other's internals.
"""

from __future__ import annotations

import math

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Llama-family ``transformers`` model (``ForCausalLM`` or base model)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expect model to be a transformers Llama-family torch.nn.Module but got {type(model).__name__}")
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise TypeError(
            f"Expect model to be a decoder-only transformers model with .model.layers (Llama family) "
            f"but {type(model).__name__} has none"
        )
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "q_proj") or not hasattr(attn, "k_proj") or not hasattr(layer, "mlp"):
            raise TypeError(
                f"Expect decoder layers with self_attn.q_proj, self_attn.k_proj and mlp (Llama anatomy) "
                f"but got {type(layer).__name__}"
            )
    return list(layers)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's ``rotate_half`` (RoPE's rotation of the two halves of the head dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def parse_thresholds(thresholds, n_layers: int) -> list[float]:
    """One float per decoder layer from ``None`` (never replay), one float, or a sequence of ``n_layers``."""
    if thresholds is None:
        return [math.inf] * n_layers
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        return [float(thresholds)] * n_layers
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.tolist()
    if isinstance(thresholds, (str, bytes)):
        raise TypeError(f"Expect thresholds as a float, None or a sequence of floats but got {thresholds!r}")
    try:
        values = [float(t) for t in thresholds]
    except (TypeError, ValueError):
        raise TypeError(f"Expect thresholds as a float, None or a sequence of floats but got {thresholds!r}") from None
    if len(values) != n_layers:
        raise ValueError(f"Expect thresholds with one value per decoder layer ({n_layers}) but got {len(values)}")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"Expect thresholds without NaN but got {values}")
    return values


def quantile_threshold(values: torch.Tensor, rate: float) -> float:
    """The threshold that replays a fraction ``rate`` of rows with TAS ``values`` (replay when TAS >= it):
    the ``1 - rate`` quantile; ``inf`` for no replay, ``-inf`` for all."""
    if rate <= 0:
        return math.inf
    if rate >= 1:
        return -math.inf
    return float(torch.quantile(values.double(), 1.0 - rate))
