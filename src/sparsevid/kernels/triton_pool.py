"""Block mean pooling in Triton: the ``draft`` planner's one pass over q and k.

One program per (block, batch x head) sums the block's real rows, gathered through ``perm`` like
the attention kernel gathers them, in float32, and divides by the block's real token count. So
the draft map reads q and k once, with no tile-order copy (the memory-bound floor of planning).
Twin: :func:`sparsevid.kernels.pooling.pool_blocks_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, head_dim_padded


def _configs():
    if INTERPRET:  # the CPU interpreter runs every config: one
        return [triton.Config({"ROWS": ROWS_MIN}, num_warps=4)]
    return [triton.Config({"ROWS": r}, num_warps=w) for r, w in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8))]


ROWS_MIN = 16  # the smallest rows per load: the kernel tiles a block size that is a multiple of it


def tiles(block_size: int) -> bool:
    """Whether the pooling kernel tiles blocks of ``block_size`` slots (a multiple of ``ROWS_MIN``)."""
    return block_size >= ROWS_MIN and block_size % ROWS_MIN == 0


def _prune(configs, named_args, **kwargs):
    """A config never reads past its block: its ROWS divide BLOCK_SIZE (48 takes 16, not 32)."""
    bs = kwargs["BLOCK_SIZE"] if "BLOCK_SIZE" in kwargs else named_args["BLOCK_SIZE"]
    return [c for c in configs if bs % c.kwargs["ROWS"] == 0]


# Memory-bound: the best rows per load and warps per program depend on the GPU; chosen once per shape.
@triton.autotune(configs=_configs(), key=["BLOCK_SIZE", "HEAD_DIM_P"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _pool_blocks(
    X, Out, perm_ptr, real_ptr,  #
    stride_xz, stride_xh, stride_xm, stride_xk,  #
    stride_oz, stride_oh, stride_om, stride_ok,  #
    H,  #
    BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_mask = offs_d < HEAD_DIM
    x_base = X + b.to(tl.int64) * stride_xz + h.to(tl.int64) * stride_xh
    acc = tl.zeros((HEAD_DIM_P,), dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK_SIZE, ROWS):
        tok = tl.load(perm_ptr + m * BLOCK_SIZE + r0 + tl.arange(0, ROWS))  # -1 = padding slot
        rows = tl.load(
            x_base + tl.maximum(tok, 0)[:, None] * stride_xm + offs_d[None, :] * stride_xk,
            mask=(tok >= 0)[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(rows.to(tl.float32), 0)
    n_real = tl.load(real_ptr + m).to(tl.float32)
    o_base = Out + b.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh + m.to(tl.int64) * stride_om
    tl.store(o_base + offs_d * stride_ok, acc / n_real, mask=d_mask)


def pool_blocks_triton(x: torch.Tensor, perm: torch.Tensor, block_tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block's real rows: ``x`` ``(B, H, L, D)`` any strides -> float32 ``(B, H, NB, D)``.

    ``perm`` int64 ``(NB * block_size,)`` and ``block_tokens`` ``(NB,)`` on x's device (``layout.on``).
    """
    if not tiles(block_size):
        raise ValueError(f"Expect block_size a multiple of {ROWS_MIN} for the Triton pooling kernel but got {block_size}")
    B, H, L, D = x.shape
    nb = block_tokens.shape[0]
    out = torch.empty(B, H, nb, D, dtype=torch.float32, device=x.device)
    _pool_blocks[(nb, B * H)](
        x, out, perm, block_tokens,  #
        *x.stride(), *out.stride(),  #
        H,  #
        BLOCK_SIZE=block_size, HEAD_DIM=D, HEAD_DIM_P=head_dim_padded(D),  #
    )
    return out
