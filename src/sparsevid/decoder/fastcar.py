"""FastCar MLP replay for autoregressive video decoding, with a real compute skip.

FastCar (arXiv 2505.14709) observes that when a decoder-only transformer generates video as
discrete tokens frame by frame, the MLP dominates decode time and the MLP output of a token is
close to that of the token at the same spatial position one frame earlier. A *Temporal Attention
Score* decides when to replay the cached output instead of computing it. Its published code still
computes the MLP and selects afterwards; here the MLP runs only on the rows that are not replayed
(gather the rows, run the MLP, scatter back).

For every hooked decoder layer ``l`` and every decoded token at position ``p >= P``
(``P = tokens_per_frame``)::

    TAS_l(p) = mean over heads h of  q_h(p) . k_h(p - P) / sqrt(head_dim)

with ``q`` and ``k`` exactly as the layer's attention uses them (after RoPE, and after the q/k
norms of models that have them; GQA key heads repeated). If ``TAS_l(p) >= threshold[l]`` the
layer's MLP output for ``p`` is the (kept) MLP output at ``p - P``; otherwise the MLP runs.

Mechanism: forward hooks, no fork of ``transformers`` code. Per decoder layer a forward-pre-hook
(reads ``position_ids`` and the rotary ``position_embeddings``), forward hooks on
``self_attn.q_proj`` / ``k_proj`` (capture q and k, compute the TAS), and an instance ``forward``
on ``mlp`` (gather / MLP / scatter). Per layer it keeps a ring of the last ``P`` keys and MLP
outputs (``(B, P, kv_heads, head_dim)`` and ``(B, P, hidden)``). :meth:`FastCarHandle.remove`
restores every module.

Scope: ``LlamaForCausalLM`` / ``LlamaModel`` and architectures with the same layer anatomy
(``layers[i].self_attn.{q_proj,k_proj}``, ``layers[i].mlp``: Mistral, Qwen2, Qwen3). Replay
applies to one-token-per-sequence decode steps; a multi-token forward (prefill) computes every
MLP row and fills the rings. A batch shares positions (equal-length prompts, no left padding).
The host syncs once per layer and step (the number of rows to compute), which a real skip needs.

Example::

    from sparsevid.decoder import fastcar
    thresholds = fastcar.calibrate(model, prompts, tokens_per_frame=64, target_rate=0.5, new_tokens=256)
    handle = fastcar.apply(model, tokens_per_frame=64, thresholds=thresholds)
    tokens = fastcar.generate(model, prompt, new_tokens=256)   # greedy, KV cache
    handle.stats()     # replay rate per layer
    handle.remove()    # native again
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from ..integrations.core import Handle
from ._llama import decoder_layers, parse_thresholds, quantile_threshold, rotate_half
from ..reuse._patch import patch_forward, replay_stats
from .fastcar_graph import calibrate_agreement

__all__ = ["FastCarHandle", "apply", "calibrate", "decoder_layers", "generate"]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, heads, D), ``cos``/``sin`` (B or 1, T, D): Llama's ``apply_rotary_pos_emb``."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------- state
@dataclass
class _LayerState:
    index: int
    heads: int
    kv_heads: int
    head_dim: int
    threshold: float = math.inf
    q: torch.Tensor | None = None  # (B, T, heads, D) of this forward
    tas: torch.Tensor | None = None  # (B,) TAS of this decode step, or None (no replay possible)
    keys: torch.Tensor | None = None  # ring (B, P, kv_heads, D)
    outs: torch.Tensor | None = None  # ring (B, P, hidden)
    rows: int = 0  # decode MLP rows seen (eligible: previous frame exists)
    replayed: int = 0  # of which replayed
    recorded: list = field(default_factory=list)  # TAS of eligible decode rows when recording


class _Session:
    """Position bookkeeping shared by a model's layer hooks."""

    def __init__(self, tokens_per_frame: int):
        self.P = tokens_per_frame
        self.start = 0  # position of the first token of the current forward
        self.T = 0  # tokens per sequence in the current forward
        self.next = 0  # position the next forward must start at (contiguity check)
        self.cos = self.sin = None
        self.record = False
        self.fresh = True  # a new sequence began in this forward: rings are reset

    def begin(self, position_ids: torch.Tensor | None, T: int) -> None:
        start = int(position_ids.reshape(-1)[0]) if position_ids is not None else self.next
        if start != 0 and start != self.next:
            raise RuntimeError(
                f"Expect FastCar decode positions to continue the sequence (next {self.next}) or restart at 0 "
                f"but got {start}; FastCar needs contiguous positions (no left padding)"
            )
        self.fresh = start == 0
        self.start, self.T, self.next = start, T, start + T

    @property
    def decode_eligible(self) -> bool:
        return self.T == 1 and self.start >= self.P


def _ring_write(ring: torch.Tensor | None, values: torch.Tensor, start: int, P: int, fresh: bool) -> torch.Tensor:
    """Write ``values`` (B, T, ...) at positions ``start..start+T-1`` into a ring (B, P, ...)."""
    B, T = values.shape[:2]
    if ring is None or fresh or ring.shape[0] != B or ring.dtype != values.dtype or ring.device != values.device:
        ring = values.new_zeros((B, P, *values.shape[2:]))
    n = min(T, P)
    if T == 1:
        ring[:, start % P] = values[:, 0]
    else:
        slots = (torch.arange(start + T - n, start + T) % P).to(values.device)
        ring.index_copy_(1, slots, values[:, T - n :])
    return ring


# ---------------------------------------------------------------------------------------- handle
class FastCarHandle(Handle):
    """What :func:`apply` returns: thresholds, the replay report, and ``remove()``."""

    def __init__(self, model, session: _Session, states: dict[int, _LayerState], restore: list):
        self.model = model
        self.session = session
        self.states = states
        self._restore = restore

    @property
    def tokens_per_frame(self) -> int:
        return self.session.P

    @property
    def thresholds(self) -> list[float]:
        """Per decoder layer (``inf`` = never replay, also for layers that are not hooked)."""
        n = len(decoder_layers(self.model))
        return [self.states[i].threshold if i in self.states else math.inf for i in range(n)]

    def set_thresholds(self, thresholds) -> None:
        """One float for every hooked layer, or a sequence with one value per decoder layer."""
        values = parse_thresholds(thresholds, len(decoder_layers(self.model)))
        for i, s in self.states.items():
            s.threshold = values[i]

    def _stats(self) -> dict:
        """Replay rate per layer over decode rows that had a previous frame, and overall.

        Returns:
            dict: ``per_layer`` (list of ``{layer, rows, replayed, rate, threshold}``), ``rows``,
            ``replayed``, ``replay_rate`` (replayed / rows over all hooked layers; ``None`` if no rows).
        """
        return replay_stats(self.states, threshold=lambda s: s.threshold)

    def reset_stats(self) -> None:
        for s in self.states.values():
            s.rows = s.replayed = 0
            s.recorded.clear()

    def record_tas(self, enabled: bool = True) -> None:
        """Keep every eligible decode row's TAS per layer (``tas()``), for calibration and plots."""
        self.session.record = enabled

    def tas(self) -> dict[int, torch.Tensor]:
        """Recorded TAS values per hooked layer (float32, CPU)."""
        return {i: torch.cat(s.recorded) if s.recorded else torch.empty(0) for i, s in self.states.items()}

    def _remove(self) -> None:
        """Remove every hook and the MLP wrappers: the model is exactly native again."""
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        self.states.clear()
        if getattr(self.model, "_sparsevid_fastcar", None) is self:
            del self.model._sparsevid_fastcar

    def __repr__(self) -> str:
        rate = self.stats()["replay_rate"]
        return (f"FastCarHandle(tokens_per_frame={self.tokens_per_frame}, layers={sorted(self.states)}, "
                f"replay_rate={'-' if rate is None else f'{rate:.3f}'})")


# ---------------------------------------------------------------------------------------- hooks
def _hook_layer(layer: torch.nn.Module, state: _LayerState, session: _Session, first: bool, restore: list) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    scale = state.head_dim**-0.5
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)

    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if first:
            session.begin(kwargs.get("position_ids"), hidden.shape[1])
        pe = kwargs.get("position_embeddings")
        session.cos, session.sin = pe if pe is not None else (None, None)

    def active() -> bool:
        return state.threshold != math.inf or session.record

    def on_q(module, args, out):
        B, T = out.shape[:2]
        q = out.view(B, T, -1, state.head_dim)
        if q_norm is not None:
            q = q_norm(q)
        state.q = q

    def on_k(module, args, out):
        B, T = out.shape[:2]
        k = out.view(B, T, -1, state.head_dim)
        if k_norm is not None:
            k = k_norm(k)
        q = state.q
        if session.cos is not None:
            cos, sin = session.cos, session.sin
            k = _rope(k, cos, sin)
            q = _rope(q, cos, sin) if session.decode_eligible and active() else q
        state.tas = None
        if session.decode_eligible and active() and state.keys is not None:
            k_prev = state.keys[:, session.start % session.P]  # (B, kv_heads, D), position p - P
            k_prev = k_prev.repeat_interleave(state.heads // state.kv_heads, dim=1)
            state.tas = (q[:, 0].float() * k_prev.float()).sum(-1).mean(-1) * scale  # (B,)
            if session.record:
                state.recorded.append(state.tas.detach().cpu())
        state.keys = _ring_write(state.keys, k.detach(), session.start, session.P, session.fresh)
        state.q = None

    native_forward = mlp.forward  # the bound class method (or an earlier instance override)

    def mlp_forward(x):
        tas = state.tas
        if tas is None or not session.decode_eligible:
            out = native_forward(x)
        else:
            B = x.shape[0]
            state.rows += B
            prev = state.outs[:, session.start % session.P]  # (B, hidden): MLP output at p - P
            replay = tas >= state.threshold
            keep = (~replay).nonzero().squeeze(1)  # the one host sync per layer and step
            n_keep = keep.numel()
            state.replayed += B - n_keep
            if n_keep == B:
                out = native_forward(x)
            else:
                out = prev.to(x.dtype).unsqueeze(1).clone()
                if n_keep:
                    out.index_copy_(0, keep, native_forward(x.index_select(0, keep)))
            state.tas = None
        state.outs = _ring_write(state.outs, out.detach(), session.start, session.P, session.fresh)
        return out

    handles = [
        layer.register_forward_pre_hook(pre, with_kwargs=True),
        attn.q_proj.register_forward_hook(on_q),
        attn.k_proj.register_forward_hook(on_k),
    ]
    restore.append(patch_forward(mlp, mlp_forward, handles))


# ---------------------------------------------------------------------------------------- public
def apply(model: torch.nn.Module, tokens_per_frame: int, thresholds=None, *, layers=None) -> FastCarHandle:
    """Add FastCar MLP replay to a Llama-family ``transformers`` model.

    Args:
        model: ``LlamaForCausalLM`` / ``LlamaModel`` (or a model with the same layer anatomy).
        tokens_per_frame (int): ``P``; the token at ``p - P`` is the same spatial position one frame earlier.
        thresholds (float | Sequence[float] | None): TAS threshold per decoder layer (one float for
            all; ``None`` or ``inf`` = never replay). From :func:`calibrate` for a target rate.
        layers (Iterable[int] | None): decoder layers to hook (default: all).

    Returns:
        FastCarHandle (``stats()``, ``set_thresholds()``, ``remove()``).

    Raises:
        TypeError: not a Llama-family model. ValueError: bad tokens_per_frame / thresholds / layers,
        or FastCar already applied.
    """
    all_layers = decoder_layers(model)
    if isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
        raise ValueError(f"Expect tokens_per_frame to be an int >= 1 but got {tokens_per_frame!r}")
    values = parse_thresholds(thresholds, len(all_layers))
    if layers is None:
        layers = range(len(all_layers))
    layers = sorted(set(layers))
    if not layers or any(not isinstance(i, int) or not 0 <= i < len(all_layers) for i in layers):
        raise ValueError(f"Expect layers as indices in [0, {len(all_layers)}) but got {layers!r}")
    if getattr(model, "_sparsevid_fastcar", None) is not None:
        raise ValueError("Expect a model without FastCar applied but it has it; call handle.remove() first")
    config = getattr(model, "config", None)
    session = _Session(tokens_per_frame)
    states, restore = {}, []
    for n, i in enumerate(layers):
        attn = all_layers[i].self_attn
        head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = attn.q_proj.out_features // head_dim
        kv_heads = attn.k_proj.out_features // head_dim
        states[i] = _LayerState(i, heads, kv_heads, head_dim, threshold=values[i])
        _hook_layer(all_layers[i], states[i], session, first=n == 0, restore=restore)
    handle = FastCarHandle(model, session, states, restore)
    model._sparsevid_fastcar = handle
    return handle


def _cache_kwarg(model) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, teacher: torch.Tensor | None = None):
    """Greedy decode with a KV cache: prefill ``prompt``, then one token per step.

    Args:
        prompt: int64 ``(B, T0)`` token ids (equal lengths; positions ``0..T0-1``).
        new_tokens (int): tokens to generate.
        teacher: optional int64 ``(B, new_tokens)``: feed these tokens instead of the model's own
            (teacher forcing), so that one changed prediction does not change the later inputs.

    Returns:
        int64 ``(B, new_tokens)``: the greedy prediction at every step.
    """
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long:
        raise TypeError(f"Expect prompt to be an int64 tensor (B, T0) but got {getattr(prompt, 'shape', prompt)!r}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"Expect new_tokens to be an int >= 1 but got {new_tokens!r}")
    if teacher is not None and (not isinstance(teacher, torch.Tensor) or teacher.shape != (prompt.shape[0], new_tokens)):
        raise ValueError(f"Expect teacher of shape {(prompt.shape[0], new_tokens)} but got {getattr(teacher, 'shape', teacher)!r}")
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    name = _cache_kwarg(model)
    out = torch.empty(prompt.shape[0], new_tokens, dtype=torch.long, device=prompt.device)
    logits = model(input_ids=prompt, use_cache=True, **{name: cache}).logits
    for i in range(new_tokens):
        token = logits[:, -1].argmax(-1)
        out[:, i] = token
        if i + 1 < new_tokens:
            fed = token if teacher is None else teacher[:, i]
            logits = model(input_ids=fed[:, None], use_cache=True, **{name: cache}).logits
    return out


def calibrate(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    tokens_per_frame: int,
    target_rate,
    new_tokens: int,
    *,
    layers=None,
    refine: int = 1,
    target_agreement: float | None = None,
) -> list[float]:
    """Per-layer TAS thresholds whose replay rate on ``prompts`` is ``target_rate``, or, with
    ``target_agreement`` (and ``target_rate=None``), the most replay at that free-running token agreement.

    For a target agreement the search is :func:`sparsevid.reuse.fastcar_graph.calibrate_agreement`
    (greedy per-layer rates on the static-cache decoder, CUDA graphs on the GPU); call it directly
    for the agreement/replay frontier it traces.

    Decodes ``prompts`` once without replay recording every eligible row's TAS; each hooked
    layer's threshold is the ``1 - rate`` quantile of its TAS. Replay upstream shifts the TAS of
    later layers, so ``refine`` more passes decode *with* the thresholds and re-take each layer's
    quantile of the TAS it now sees.

    Args:
        prompts: int64 ``(B, T0)`` with ``T0 >= tokens_per_frame`` (at least one frame).
        target_rate (float | Sequence[float] | None): replay fraction in [0, 1] (one per decoder layer, or one for all).
        new_tokens (int): tokens decoded per pass.
        layers: decoder layers that may replay (default: all); others get ``inf``.
        refine (int): passes with replay on (default 1).
        target_agreement (float | None): free-running token agreement with the no-replay decode of
            ``prompts`` to keep (in (0, 1]); the replay rate is then maximised layer by layer.

    Returns:
        list[float]: one threshold per decoder layer.
    """
    n = len(decoder_layers(model))
    if target_agreement is not None:
        if target_rate is not None:
            raise ValueError(f"Expect one of target_rate and target_agreement but got both ({target_rate!r}, {target_agreement!r})")
        return calibrate_agreement(model, prompts, tokens_per_frame, target_agreement, new_tokens, layers=layers)["thresholds"]
    if target_rate is None:
        raise ValueError("Expect target_rate (or target_agreement) but got None")
    rates = [float(target_rate)] * n if isinstance(target_rate, (int, float)) else [float(r) for r in target_rate]
    if len(rates) != n or any(not 0.0 <= r <= 1.0 for r in rates):
        raise ValueError(f"Expect target_rate in [0, 1] (one float or one per layer, {n} layers) but got {target_rate!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"Expect refine to be an int >= 0 but got {refine!r}")
    hooked = range(n) if layers is None else layers
    handle = apply(model, tokens_per_frame, None, layers=hooked)
    try:
        thresholds = [math.inf] * n
        for _ in range(1 + refine):
            handle.set_thresholds(thresholds)
            handle.reset_stats()
            handle.record_tas(True)
            generate(model, prompts, new_tokens)
            for i, values in handle.tas().items():
                if not len(values):
                    raise ValueError(
                        f"Expect prompts and new_tokens that decode tokens with a previous frame "
                        f"(prompt length + new_tokens > tokens_per_frame={tokens_per_frame}) but layer {i} saw none"
                    )
                thresholds[i] = quantile_threshold(values, rates[i])
    finally:
        handle.remove()
    return thresholds
