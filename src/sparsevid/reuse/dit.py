"""Token-level FFN replay across adjacent frames inside one video-DiT forward (FastCar for DiTs).

In a video DiT every frame is denoised in the same forward, so "the previous frame" is available
in the same block: for the token at ``(f, y, x)``, ``f >= 1``, of transformer block ``l``::

    TAS_l(f, y, x) = mean over heads h of  q_h(f, y, x) . k_h(f - 1, y, x) / sqrt(head_dim)

with ``q``/``k`` the block's self-attention query and key after its q/k norms (before RoPE: the
capture point every diffusers video attention shares; RoPE's temporal part rotates every
``(f, f-1)`` pair by the same angle). Tokens with a high TAS take the feed-forward output of the
token at the same position in the previous frame (or the nearest earlier frame whose FFN ran,
when that one was replayed too); the FFN runs only on the other rows (gather the rows, run
``ffn``, scatter back, gather the replayed rows from their sources): a real compute skip.

Selection (:class:`TokenReplay`):

- ``rate=r``: in every block and forward, the ``round(r * (F-1) * H * W)`` tokens of each batch
  element with the highest TAS are replayed. Static row counts: no host sync, shape-stable
  (CUDA-graph / compile friendly), and the speedup is known in advance.
- ``threshold=t``: tokens with ``TAS >= t`` are replayed (the count varies; one host sync per block).

Frame 0 always computes. Mechanism: a forward-pre-hook on the transformer reads the latent grid;
per block, forward hooks on ``attn1.norm_q`` / ``norm_k`` capture q and k and compute the TAS,
and an instance ``forward`` on ``ffn`` gathers/scatters. ``remove()`` restores every module
(bit-identical native output). Supported: the models whose registry entry (:mod:`sparsevid.integrations.models`)
names their replay blocks — the Wan family (Wan2.1/2.2 and the project's testbed, ChronoEdit,
Wan-Animate, SkyReels-V2); other models raise ``NotImplementedError("NYI: ...")``.

Shape legend: ``B`` batch, ``F, H, W`` latent grid in tokens, ``S = H*W`` tokens per frame,
``L = F*S``, ``C`` hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..integrations.core import Handle
from ..integrations.models import bind_call, model_spec
from ._patch import patch_forward, replay_stats

__all__ = ["TokenReplay", "TokenReplayHandle", "apply_token_replay", "replay_sources"]



@dataclass(frozen=True)
class TokenReplay:
    """Token-level FFN replay across adjacent frames (``sparsevid.apply(..., reuse=TokenReplay(...))``).

    Attributes:
        rate (float | None): fraction in ``[0, 1)`` of the tokens with a previous frame to replay in
            every block (top TAS). Exactly one of ``rate`` / ``threshold``.
        threshold (float | None): replay tokens with ``TAS >= threshold``.
        layers (tuple[int, ...] | None): transformer blocks that replay (default: all but block 0,
            whose output every later block builds on).
    """

    rate: float | None = None
    threshold: float | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if (self.rate is None) == (self.threshold is None):
            raise ValueError(
                f"Expect exactly one of rate / threshold for TokenReplay but got rate={self.rate!r}, "
                f"threshold={self.threshold!r}"
            )
        if self.rate is not None and (
            isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0.0 <= self.rate < 1.0
        ):
            raise ValueError(f"Expect rate as a float in [0, 1) but got {self.rate!r}")
        if self.threshold is not None and (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or math.isnan(self.threshold)
        ):
            raise ValueError(f"Expect threshold as a float (not NaN) but got {self.threshold!r}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"Expect layers as a sequence of block indices >= 0 but got {self.layers!r}")
            object.__setattr__(self, "layers", layers)


def replay_sources(compute: torch.Tensor) -> torch.Tensor:
    """For every token, the frame whose FFN output it takes.

    Args:
        compute: bool ``(B, F, S)``; True = the FFN runs for this token (frame 0 must be all True).

    Returns:
        int64 ``(B, F, S)``: ``f`` where ``compute``, else the nearest earlier computed frame.
    """
    frames = torch.arange(compute.shape[1], device=compute.device).view(1, -1, 1)
    return torch.where(compute, frames, torch.zeros_like(frames)).cummax(dim=1).values


class _BlockState:
    def __init__(self, index: int, heads: int):
        self.index = index
        self.heads = heads
        self.q: torch.Tensor | None = None
        self.tas: torch.Tensor | None = None  # (B, F-1, S) float32
        self.rows = 0
        self.replayed = 0


class TokenReplayHandle(Handle):
    """What :func:`apply_token_replay` returns: ``stats()`` and ``remove()``."""

    def __init__(self, transformer, config: TokenReplay, states: dict[int, _BlockState], restore: list):
        self.transformer = transformer
        self.config = config
        self.states = states
        self._restore = restore

    def _stats(self) -> dict:
        """FFN rows seen and replayed, per block and in all (``replay_rate`` over all rows, frame 0 included)."""
        return replay_stats(self.states)

    def reset_stats(self) -> None:
        for s in self.states.values():
            s.rows = s.replayed = 0

    def _remove(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        self.states.clear()


def apply_token_replay(transformer: torch.nn.Module, config: TokenReplay) -> TokenReplayHandle:
    """Add token-level FFN replay to a diffusers video transformer.

    Args:
        transformer: a model whose registry entry (:mod:`sparsevid.integrations.models`) names its replay blocks (Wan family).
        config (TokenReplay): rate or threshold, and blocks.

    Returns:
        TokenReplayHandle; ``remove()`` restores the native forward exactly.

    Raises:
        TypeError: config is not a TokenReplay. ValueError: a block index out of range.
        NotImplementedError: another model class (NYI).
    """
    if not isinstance(config, TokenReplay):
        raise TypeError(f"Expect config to be a sparsevid.reuse.TokenReplay but got {type(config).__name__}")
    spec = model_spec(transformer)
    if spec.replay is None:
        raise NotImplementedError(f"NYI: token replay for {type(transformer).__name__}")
    blocks = spec.replay(transformer)  # (self-attention, ffn) per block
    layers = config.layers if config.layers is not None else tuple(range(1, len(blocks)))
    if any(i >= len(blocks) for i in layers):
        raise ValueError(f"Expect TokenReplay layers in [0, {len(blocks)}) but got {config.layers!r}")
    grid = {}
    restore = []

    def pre(module, args, kwargs):
        grid["fhw"] = spec.grid(module, bind_call(module, args, kwargs))

    h = transformer.register_forward_pre_hook(pre, with_kwargs=True)
    restore.append(h.remove)
    states = {}
    for i in sorted(set(layers)):
        attn, ffn = blocks[i]
        states[i] = _BlockState(i, attn.heads)
        _hook_block(attn, ffn, states[i], config, grid, restore)
    return TokenReplayHandle(transformer, config, states, restore)


def _hook_block(attn, ffn, state: _BlockState, config: TokenReplay, grid: dict, restore: list) -> None:
    q_src = attn.norm_q if isinstance(getattr(attn, "norm_q", None), torch.nn.Module) else attn.to_q
    k_src = attn.norm_k if isinstance(getattr(attn, "norm_k", None), torch.nn.Module) else attn.to_k
    heads = state.heads

    def on_q(module, args, out):
        state.q = out

    def on_k(module, args, out):
        F_, H_, W_ = grid["fhw"]
        S = H_ * W_
        q, state.q = state.q, None
        state.tas = None
        if F_ < 2 or q is None or out.shape[1] != F_ * S:
            return
        B = out.shape[0]
        d = out.shape[-1] // heads
        qf = q.view(B, F_, S, -1)[:, 1:].float()
        kf = out.view(B, F_, S, -1)[:, :-1].float()
        state.tas = (qf * kf).sum(-1) / (heads * math.sqrt(d))  # (B, F-1, S)

    native_forward = ffn.forward

    def ffn_forward(x, *args, **kwargs):
        tas, state.tas = state.tas, None
        if tas is None or args or kwargs:
            return native_forward(x, *args, **kwargs)
        F_, H_, W_ = grid["fhw"]
        B, L, C = x.shape
        S = H_ * W_
        eligible = (F_ - 1) * S
        state.rows += B * L
        compute = torch.ones(B, F_, S, dtype=torch.bool, device=x.device)
        if config.rate is not None:
            n_replay = int(round(config.rate * eligible))
            if n_replay == 0:
                return native_forward(x)
            top = tas.reshape(B, eligible).topk(n_replay, dim=1, sorted=False).indices
            flat = compute[:, 1:].reshape(B, eligible).clone()
            flat.scatter_(1, top, False)
            compute[:, 1:] = flat.view(B, F_ - 1, S)
            n_compute = B * (L - n_replay)
        else:
            compute[:, 1:] = tas < config.threshold
            n_compute = int(compute.sum())  # host sync: the row count
            if n_compute == B * L:
                return native_forward(x)
        state.replayed += B * L - n_compute
        mask = compute.reshape(-1)
        if hasattr(torch, "nonzero_static"):
            rows = torch.nonzero_static(mask, size=n_compute).squeeze(1)
        else:
            rows = mask.nonzero().squeeze(1)
        x_flat = x.reshape(B * L, C)
        computed = native_forward(x_flat.index_select(0, rows).unsqueeze(0))[0]  # (n_compute, C_out)
        out = computed.new_empty(B * L, computed.shape[-1])
        out.index_copy_(0, rows, computed)
        src_frame = replay_sources(compute)  # (B, F, S)
        src = (torch.arange(B, device=x.device).view(B, 1, 1) * L + src_frame * S
               + torch.arange(S, device=x.device).view(1, 1, S))
        return out.index_select(0, src.reshape(-1)).view(B, L, -1)

    handles = [q_src.register_forward_hook(on_q), k_src.register_forward_hook(on_k)]
    restore.append(patch_forward(ffn, ffn_forward, handles))
