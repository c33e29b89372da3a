"""FastCar's per-layer decision in one Triton launch: the temporal attention score (TAS) of each new row and
whether its MLP output is replayed.

For a row at position ``p`` (``p >= P``, one frame of ``P`` tokens back exists) the TAS is the mean over query
heads of ``scale * q_h · k_{h'}[p - P]``, the key of the same slot one frame earlier (``h'`` the key head a grouped
query head reads), and the row replays when its TAS reaches the layer's threshold. In PyTorch that is a gather
of the earlier keys from the cache, two upcasts, a product, two reductions, a scale, a comparison and a mask
(:func:`sparsevid.decoder.fastcar_graph._decide` after ``index_select``): nine small kernels a layer, which in a
captured decode step at batch 1 cost about as much as the MLP work the decision saves (0.85x the graph baseline
with nothing replayed, H100, llama3.2-1b shape). One program per row reads the row's query heads and the earlier
keys straight from the cache.

Shape legend: ``B`` batch, ``H`` query heads, ``KVH`` key heads, ``T`` new rows, ``D`` head dim, ``S`` cache slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decide_triton"]


@triton.jit
def _decide_kernel(
    Q, KCache, Pos, Thr, Tas, Replay, scale,  #
    stride_qb, stride_qh, stride_qt, stride_qd,  #
    stride_kb, stride_kh, stride_ks, stride_kd,  #
    T, H, GROUP, P,  #
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,  #
):
    row = tl.program_id(0)
    b = (row // T).to(tl.int64)
    t = row % T
    pos = tl.load(Pos + t)
    slot = tl.maximum(pos - P, 0).to(tl.int64)  # the same slot one frame earlier (clamped: masked below)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < H)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + offs_h[:, None] * stride_qh + t * stride_qt + offs_d[None, :] * stride_qd,
                mask=mask, other=0.0).to(tl.float32)
    kv_head = (offs_h // GROUP).to(tl.int64)
    k = tl.load(KCache + b * stride_kb + kv_head[:, None] * stride_kh + slot * stride_ks + offs_d[None, :] * stride_kd,
                mask=mask, other=0.0).to(tl.float32)
    tas = tl.sum(tl.sum(q * k, 1), 0) / H * scale
    replay = (pos >= P) & (tas >= tl.load(Thr))
    tl.store(Tas + row, tas)
    tl.store(Replay + row, replay.to(tl.uint8))


def decide_triton(q: torch.Tensor, k_cache: torch.Tensor, positions: torch.Tensor, tokens_per_frame: int,
                  threshold: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tas, replay)``: float32 and bool ``(B, T)`` for the rows ``q`` ``(B, H, T, D)`` (any strides) at
    ``positions`` (int64 ``(T,)`` on the device), from this layer's key cache ``k_cache`` ``(B, KVH, S, D)`` (the
    earlier frame's keys already in it) and ``threshold`` (float32, one element on the device). Equals
    ``_decide(q, k_cache.index_select(2, (positions - P).clamp(min=0)), positions >= P, threshold, scale)`` up to
    float32 summation order."""
    B, H, T, D = q.shape
    kvh = k_cache.shape[1]
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D or H % kvh:
        raise ValueError(f"Expect k_cache of shape (B={B}, KVH dividing H={H}, S, D={D}) but got "
                         f"{tuple(k_cache.shape)}")
    if positions.shape != (T,) or threshold.numel() != 1:
        raise ValueError(f"Expect positions of shape ({T},) and a one-element threshold but got "
                         f"{tuple(positions.shape)} and {threshold.numel()} elements")
    tas = torch.empty(B, T, dtype=torch.float32, device=q.device)
    replay = torch.empty(B, T, dtype=torch.bool, device=q.device)
    _decide_kernel[(B * T,)](
        q, k_cache, positions, threshold, tas, replay.view(torch.uint8), scale,  #
        *q.stride(), *k_cache.stride(),  #
        T, H, H // kvh, tokens_per_frame,  #
        BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D), HEAD_DIM=D, num_warps=4,
    )
    return tas, replay
