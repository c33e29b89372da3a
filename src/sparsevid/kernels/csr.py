"""Kept-block mask to CSR lists where plans are made: one Triton pass on CUDA (:mod:`.triton_csr`), else the
PyTorch twin :func:`sparsevid.plan._dense_to_csr`. The plan sits below the kernels and converts in PyTorch only;
the planners and the ring, above the kernels, convert here."""

from __future__ import annotations

import importlib.util

import torch

from ..plan import _dense_to_csr


def dense_to_csr(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(..., N)`` -> (int32 counts ``(...)``, int32 ascending indices ``(..., width)``, zero tail): the
    same lists as :func:`sparsevid.plan._dense_to_csr`."""
    if keep.is_cuda and importlib.util.find_spec("triton") is not None:
        from .triton_csr import MAX_COLUMNS, mask_to_csr_triton

        if keep.shape[-1] <= MAX_COLUMNS:
            return mask_to_csr_triton(keep, width)  # the same in one pass
    return _dense_to_csr(keep, width)
