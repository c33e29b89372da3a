"""Kept-block mask to CSR lists in Triton: the last step of every block planner, in one pass.

One program per (batch, head, query block) row reads the row's ``N`` keep flags, ranks the kept
columns with a prefix sum, and writes each kept column index at its rank (ascending by
construction) and the row's count. Twin: :func:`sparsevid.plan._dense_to_csr` (PyTorch: a
cumulative sum and a scatter, several passes over the mask).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_COLUMNS = 8192  # one program holds a whole row


@triton.jit
def _mask_to_csr(Keep, Counts, Indices, N, WIDTH, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = tl.load(Keep + row * N + cols, mask=cols < N, other=0).to(tl.int32)
    rank = tl.cumsum(keep, 0) - 1
    tl.store(Indices + row * WIDTH + rank, cols.to(tl.int32), mask=(keep > 0) & (rank < WIDTH))
    tl.store(Counts + row, tl.sum(keep, 0))


def mask_to_csr_triton(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(..., N)`` -> (int32 counts ``(...)``, int32 ascending indices ``(..., width)``, zero tail)."""
    n = keep.shape[-1]
    if keep.dtype != torch.bool or not 1 <= n <= MAX_COLUMNS:  # one program holds a row: a wider one overruns it
        raise ValueError(f"Expect a bool mask of 1 to {MAX_COLUMNS} columns for the Triton CSR kernel but got "
                         f"{keep.dtype} with {n}")
    keep = keep.contiguous()
    rows = keep.numel() // n
    counts = torch.empty(keep.shape[:-1], dtype=torch.int32, device=keep.device)
    indices = torch.zeros(*keep.shape[:-1], width, dtype=torch.int32, device=keep.device)
    _mask_to_csr[(rows,)](keep.view(torch.uint8), counts, indices, n, width,
                          BLOCK=max(16, triton.next_power_of_2(n)), num_warps=4)
    return counts, indices
