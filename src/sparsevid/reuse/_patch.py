"""What the replay hooks share: installing a ``forward`` with its exact undo, and the replay report."""

from __future__ import annotations

from typing import Callable

import torch


def patch_forward(module: torch.nn.Module, forward: Callable, handles: list) -> Callable[[], None]:
    """Give ``module`` the instance ``forward``; return the undo that also removes ``handles``.

    The undo restores an earlier instance override if there was one, else deletes the attribute so
    the class method shows through again.
    """
    earlier = module.__dict__.get("forward")
    module.forward = forward

    def undo() -> None:
        for handle in handles:
            handle.remove()
        if earlier is not None:
            module.forward = earlier
        else:
            del module.forward

    return undo


def replay_stats(states: dict, **per_layer) -> dict:
    """Rows seen and replayed per hooked layer (``states[i].rows`` / ``.replayed``) and in all.

    ``per_layer`` maps extra row keys to a function of the layer's state (e.g. its threshold).
    ``rate`` / ``replay_rate`` is ``None`` where no row was seen.
    """
    rows = [dict(layer=i, rows=s.rows, replayed=s.replayed, rate=s.replayed / s.rows if s.rows else None,
                 **{key: f(s) for key, f in per_layer.items()}) for i, s in sorted(states.items())]
    seen = sum(s.rows for s in states.values())
    replayed = sum(s.replayed for s in states.values())
    return dict(per_layer=rows, rows=seen, replayed=replayed, replay_rate=replayed / seen if seen else None)
