"""The ``triton`` backend: sparsevid's Triton kernels, with the tile permutation fused into their
loads and stores — ``triton_blocksparse`` for a ``BlockPlan``, ``triton_gather`` for a ``TokenPlan``.
The portable GPU path (any CUDA GPU Triton supports); on the CPU only under the Triton interpreter
(``TRITON_INTERPRET=1``, tests; float16 only there)."""

from __future__ import annotations

import importlib.util
import os

import torch

from ..backends import register_backend
from ..plan import BlockPlan
from ..token_plan import TokenPlan


def _requires() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'sparsevid[triton]')"
    return None


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@register_backend(
    "triton", plans=(BlockPlan, TokenPlan),
    devices=("cuda", "cpu") if _INTERPRET else ("cuda",),
    dtypes=(torch.float16,) if _INTERPRET else (torch.float16, torch.bfloat16),
    dtype_note="the Triton interpreter, TRITON_INTERPRET=1, computes bfloat16 wrongly" if _INTERPRET else None,
    # the block is the query tile: tl.arange needs a power of two
    head_dims=(64, 96, 128), block_sizes=(16, 32, 64, 128), priority=20, auto_devices=("cuda",),
    requires=_requires,
    description="sparsevid's Triton kernels (FlashAttention-2 class), permutation fused; BlockPlan and TokenPlan",
)
def _triton_backend(q, k, v, plan, scale):
    B, H = q.shape[:2]
    if isinstance(plan, TokenPlan):
        from .triton_gather import token_sparse_attn

        kv_num_tokens = plan.kv_num_tokens.expand(B, H, -1)
        kv_tokens = plan.kv_tokens.expand(B, H, -1, -1)
        return token_sparse_attn(q, k, v, plan.perm, kv_num_tokens, kv_tokens, plan.block_size, scale)

    from .triton_blocksparse import block_sparse_attn, launch_tables

    # A broadcast plan becomes a stride-0 view: the kernel indexes it with q's batch and head.
    kv_num_blocks = plan.kv_num_blocks.expand(B, H, -1)
    kv_indices = plan.kv_indices.expand(B, H, -1, -1)
    block_real, order = plan.derived(f"triton_launch_{B}x{H}", lambda: launch_tables(
        plan.perm, kv_num_blocks, plan.block_size, B, H))
    return block_sparse_attn(q, k, v, plan.perm, kv_num_blocks, kv_indices, plan.block_size, scale, block_real, order)
