"""``--reuse SPEC`` (``bench e2e``, ``eval``) -> objects for ``sparsevid.apply(..., reuse=...)``.

SPEC is ``KIND:KEY=VALUE,...`` with KIND one of ``replay`` (:class:`sparsevid.reuse.TokenReplay`),
``fbc`` (``FirstBlockCacheConfig``), ``taylorseer`` (``TaylorSeerCacheConfig``), ``magcache``
(``MagCacheConfig``); VALUEs are Python literals. Several join with ``+`` into one setting, e.g.
``replay:rate=0.1+fbc:threshold=0.05`` (``sparsevid.apply`` takes at most one token replay and one step cache).
"""

from __future__ import annotations

import ast
import re
from dataclasses import fields

__all__ = ["parse_reuse", "reuse_label"]

_JOIN = re.compile(r"\+(?=\s*[A-Za-z_]\w*\s*:)")  # a '+' before the next KIND: (not the one of 1e+9)


def _kinds() -> dict:
    import diffusers.hooks as hooks

    from .dit import TokenReplay

    return {"replay": TokenReplay, "fbc": hooks.FirstBlockCacheConfig, "taylorseer": hooks.TaylorSeerCacheConfig,
            "magcache": hooks.MagCacheConfig}


def _parse_one(part: str, spec: str, kinds: dict):
    kind, _, options = part.partition(":")
    kind = kind.strip()
    if kind not in kinds:
        raise ValueError(f"Expect --reuse KIND:KEY=VALUE,... with KIND in {sorted(kinds)} but got {spec!r}")
    try:
        call = ast.parse(f"f({options})", mode="eval").body
        if call.args or any(kw.arg is None for kw in call.keywords):
            raise ValueError("a value without KEY=")
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        if kind == "replay" and "layers" in kwargs:
            kwargs["layers"] = tuple(kwargs["layers"])
        return kinds[kind](**kwargs)
    except (SyntaxError, TypeError, ValueError) as e:
        raise ValueError(f"Expect --reuse options as KEY=VALUE pairs valid for {kinds[kind].__name__} "
                         f"but got {spec!r} ({e})") from e


def parse_reuse(specs: str | list[str]) -> list:
    """One SPEC, or a list of them, -> one ``reuse=`` list.

    Raises:
        ValueError: naming the SPEC: an unknown KIND or bad options.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    kinds = _kinds()
    return [_parse_one(part, spec, kinds) for spec in specs for part in _JOIN.split(spec)]


def reuse_label(r) -> str:
    """``TokenReplay(rate=0.3)``: the class and its non-default fields."""
    defaults = {f.name: f.default for f in fields(r)}
    changed = {k: v for k, v in vars(r).items() if k in defaults and v != defaults[k]}
    return f"{type(r).__name__}({', '.join(f'{k}={v}' for k, v in changed.items())})"
