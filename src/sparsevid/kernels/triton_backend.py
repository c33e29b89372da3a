"""The Triton backends: sparsevid's Triton kernels, with the tile permutation fused into their loads and
stores — ``triton``: ``triton_blocksparse`` for a ``BlockPlan`` (with the tail fused in), ``triton_gather``
for a ``TokenPlan``; ``triton-int8`` / ``triton-fp8``: ``triton_quant``. The portable GPU path (any CUDA GPU
Triton supports); on the CPU only under the Triton interpreter (``TRITON_INTERPRET=1``, tests; float16
only there). The kernel modules are imported at the first call, so registering these backends needs no
Triton installed."""

from __future__ import annotations

import importlib.util
import os

import torch

from ..backends import register_backend
from ..plan import BlockPlan
from ..token_plan import TokenPlan

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DEVICES = ("cuda", "cpu") if _INTERPRET else ("cuda",)  # CPU: the interpreter


def _requires() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'sparsevid[triton]')"
    return None


@register_backend(
    "triton", plans=(BlockPlan, TokenPlan),
    devices=_DEVICES,
    dtypes=(torch.float16,) if _INTERPRET else (torch.float16, torch.bfloat16),
    dtype_note="the Triton interpreter, TRITON_INTERPRET=1, computes bfloat16 wrongly" if _INTERPRET else None,
    # the block is the query tile: tl.arange needs a power of two
    head_dims=(64, 96, 128), block_sizes=(16, 32, 64, 128), priority=20, auto_devices=("cuda",),
    requires=_requires, tail=True,
    description="sparsevid's Triton kernels (FlashAttention-2 class), permutation fused; BlockPlan and TokenPlan",
)
def _triton_backend(q, k, v, plan, scale, tail=None):
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
    if tail is None:
        return block_sparse_attn(q, k, v, plan.perm, kv_num_blocks, kv_indices, plan.block_size, scale, block_real,
                                 order)
    from .triton_blocksparse import block_sparse_attn_tail
    from ..tail import decide_tail
    from .triton_tail import tail_operands

    s, kept = tail_operands(k, v, plan, tail)
    gate = decide_tail(q, k, v, plan.layout, kept, s, scale, tail.probes)
    return block_sparse_attn_tail(q, k, v, plan.perm, kv_num_blocks, kv_indices, plan.block_size, scale, block_real,
                                  order, s.keys, s.values, s.key_var, s.key_radius, s.log_count, kept, gate,
                                  s.per_block)


@register_backend(
    "triton-int8", plans=(BlockPlan,), devices=_DEVICES, dtypes=(torch.float16, torch.bfloat16), head_dims=(64, 128),
    block_sizes=(16, 32, 64, 128), min_capability=(8, 0), priority=20, auto_devices=("cuda",), requires=_requires,
    quant="int8",
    description="8-bit Triton block-sparse: smoothed INT8 Q·Kᵀ per block (int32 acc), fp16 P·V; permutation fused",
)
def _triton_int8(q, k, v, plan, scale):
    from .triton_quant import quant_attention

    return quant_attention(q, k, v, plan, scale, "int8")


@register_backend(
    "triton-fp8", plans=(BlockPlan,), devices=_DEVICES, dtypes=(torch.float16, torch.bfloat16), head_dims=(64, 128),
    block_sizes=(32, 64, 128), min_capability=(8, 9), priority=20, auto_devices=("cuda",), requires=_requires,
    quant="fp8",
    description="8-bit Triton block-sparse: smoothed FP8 e4m3 Q·Kᵀ per block, e4m3 P·V; sm89+ (Ada, Hopper)",
)
def _triton_fp8(q, k, v, plan, scale):
    from .triton_quant import quant_attention

    return quant_attention(q, k, v, plan, scale, "fp8")
