"""Means over groups of consecutive tile-order slots: blocks (the ``draft`` planner's pooled q and k)
and the tail's summary groups (blocks or sub-blocks of skipped key blocks, :mod:`sparsevid.tail`).

On CUDA the block means are one Triton pass (:mod:`sparsevid.kernels.triton_pool`); the PyTorch twins
here are the CPU path and the kernels' oracle.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``NB`` blocks, ``G`` groups.
"""

from __future__ import annotations

import importlib.util

import torch

from ..layout import VideoLayout

__all__ = ["group_mean_reference", "group_tables", "pool_blocks", "pool_blocks_reference"]


def pool_blocks(x: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """Mean of each block's real tokens: ``(B, H, L, D)`` -> float32 ``(B, H, NB, D)``.

    On CUDA a Triton kernel reads ``x`` once through the permutation (block sizes it tiles); elsewhere
    :func:`pool_blocks_reference`.
    """
    tables = layout.on(x.device)
    if x.is_cuda and importlib.util.find_spec("triton") is not None:
        from .triton_pool import pool_blocks_triton, tiles

        if tiles(layout.block_size):  # else the PyTorch twin: a launch past its tiles would read out of bounds
            return pool_blocks_triton(x, tables.perm, tables.block_tokens, layout.block_size)
    return pool_blocks_reference(x, layout)


def pool_blocks_reference(x: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """PyTorch twin of the pooling kernel: one head at a time in float32 (never a float32 copy of x)."""
    tables = layout.on(x.device)
    return group_mean_reference(x, tables.block_of_token, tables.block_tokens)


def group_tables(layout: VideoLayout, group: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group_of_token, group_tokens)`` for groups of ``group`` consecutive tile-order slots (``group``
    divides ``block_size``): int64 ``(L,)`` the group of each token, int64 ``(NB * block_size // group,)``
    real tokens per group (0 for the empty groups of a short last block). Built once per layout, group and
    device, with the layout's own tables."""
    key = (str(torch.device(device)), "groups", group)
    tables = layout._device_tables.get(key)
    return tables if tables is not None else _build_group_tables(layout, group, key)


@torch.compiler.disable  # eager, like the layout's tables: torch 2.13's CPU inductor miscompiles ``arange // n``
@torch.inference_mode(False)  # cached: must stay usable by autograd
def _build_group_tables(layout: VideoLayout, group: int, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    tables = layout.on(key[0])
    count = layout.num_slots // group
    tokens = torch.bincount(torch.arange(layout.num_tokens, device=key[0]) // group, minlength=count)
    layout._device_tables[key] = (tables.inverse_perm // group, tokens)
    return layout._device_tables[key]


def group_mean_reference(x: torch.Tensor, group_of_token: torch.Tensor, group_tokens: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``(B, H, L, D)`` over each group's tokens -> float32 ``(B, H, G, D)`` (zeros for empty
    groups), one head at a time (never a float32 copy of ``x``)."""
    B, H, L, D = x.shape
    pooled = torch.zeros(B, H, group_tokens.numel(), D, dtype=torch.float32, device=x.device)
    for h in range(H):
        pooled[:, h].index_add_(1, group_of_token, x[:, h].float())
    return pooled / group_tokens.clamp(min=1).float()[:, None]
