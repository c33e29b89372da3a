"""The Triton backends: sparsevid's Triton kernels, with the tile permutation fused into their loads and
stores — ``triton``: ``triton_blocksparse`` for a ``BlockPlan`` (with the tail fused in), ``triton_gather``
for a ``TokenPlan``, ``triton_cluster`` for a ``ClusterPlan`` (its cluster tail fused in); ``triton-int8`` /
``triton-fp8``: ``triton_quant``. The portable GPU path (any CUDA GPU Triton supports); on the CPU only
under the Triton interpreter (``TRITON_INTERPRET=1``, tests; float16 only there). The kernel modules are
imported at the first call, so registering these backends needs no Triton installed."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backends import register_backend, register_quant_backends
from ..cluster_plan import ClusterPlan
from ..plan import BlockPlan
from ..tail import decide_cluster_tail, tail_operands
from ..token_plan import TokenPlan

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DEVICES = ("cuda", "cpu") if _INTERPRET else ("cuda",)  # CPU: the interpreter

# What the Triton attention kernels can tile, declared here (no Triton import) for the registrations below and
# checked again by each launcher before it launches (a launch past these reads out of bounds).
BLOCK_SIZES = (16, 32, 64, 128)  # the block is the query tile: tl.arange needs a power of two, tl.dot >= 16 rows
FP8_BLOCK_SIZES = (32, 64, 128)  # e4m3 P·V dots reduce over >= 32 keys
QUANT_HEAD_DIMS = (64, 128)  # the 8-bit pre-pass tiles the head dim unpadded
MAX_HEAD_DIM = 256  # the exact kernels pad the head dim to a power of two; one tile row holds it


def _requires() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'sparsevid[triton]')"
    return None


@dataclass(frozen=True)
class BlockLaunch:
    """What a Triton block-sparse launch (``triton``, ``triton-int8``, ``triton-fp8``) reads of a ``BlockPlan`` for
    ``B`` x ``H`` inputs: the plan's lists expanded to them (stride-0 views where the plan broadcasts), its block
    size, and the launch tables (:func:`~sparsevid.kernels.triton_blocksparse.launch_tables`). Built once per plan
    and input shape by :meth:`build` (``plan.launch(BlockLaunch, B, H)``), which checks that the kernels tile the
    plan's blocks, so a reused plan launches with no preparatory work."""

    plan_type: ClassVar[type] = BlockPlan
    perm: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    block_real: torch.Tensor
    order: torch.Tensor

    @classmethod
    def build(cls, plan: BlockPlan, B: int, H: int) -> "BlockLaunch":
        from .triton_blocksparse import launch_tables
        from .triton_common import check_tiling

        check_tiling("the Triton block-sparse kernel", plan.block_size, BLOCK_SIZES)
        kv_num_blocks = plan.kv_num_blocks.expand(B, H, -1)
        kv_indices = plan.kv_indices.expand(B, H, -1, -1)
        block_real, order = launch_tables(plan.perm, kv_num_blocks, plan.block_size, B, H)
        return cls(plan.perm, kv_num_blocks, kv_indices, plan.block_size, block_real, order)


@dataclass(frozen=True)
class TokenLaunch:
    """What the Triton gather kernel reads of a ``TokenPlan`` for ``B`` x ``H`` inputs: its lists expanded to them and
    its block size, checked and built once per plan and input shape (``plan.launch(TokenLaunch, B, H)``)."""

    plan_type: ClassVar[type] = TokenPlan
    perm: torch.Tensor
    kv_num_tokens: torch.Tensor
    kv_tokens: torch.Tensor
    block_size: int

    @classmethod
    def build(cls, plan: TokenPlan, B: int, H: int) -> "TokenLaunch":
        from .triton_common import check_tiling

        check_tiling("the Triton gather kernel", plan.block_size, BLOCK_SIZES)
        return cls(plan.perm, plan.kv_num_tokens.expand(B, H, -1), plan.kv_tokens.expand(B, H, -1, -1), plan.block_size)


def summarize_tail(k, v, layout, method):
    """The tail's summaries in one Triton pass (the builder the ``triton`` and ``fa4`` backends declare)."""
    from .triton_tail import summarize_triton

    return summarize_triton(k, v, layout, method.group_size(layout))


def _ring_step(q, k, v, perm, kv_num_blocks, kv_indices, block_size, scale, *, tail, kept, gate, key_perm):
    from .triton_blocksparse import sparse_attention_triton

    return sparse_attention_triton(q, k, v, perm, kv_num_blocks, kv_indices, block_size, scale, tail=tail, kept=kept,
                                   gate=gate, key_perm=key_perm, return_lse=True)


@register_backend(
    "triton", plans=(BlockPlan, TokenPlan, ClusterPlan),
    devices=_DEVICES,
    dtypes=(torch.float16,) if _INTERPRET else (torch.float16, torch.bfloat16),
    dtype_note="the Triton interpreter, TRITON_INTERPRET=1, computes bfloat16 wrongly" if _INTERPRET else None,
    head_dims=(64, 96, 128), block_sizes=BLOCK_SIZES, priority=20, auto_devices=("cuda",),
    requires=_requires, summarize=summarize_tail, ring_step=_ring_step,
    description="sparsevid's Triton kernels (FlashAttention-2 class), permutation fused; BlockPlan, TokenPlan, "
                "ClusterPlan",
)
def _triton_backend(q, k, v, plan, scale, tail=None):
    B, H = q.shape[:2]
    if isinstance(plan, ClusterPlan):
        from .triton_cluster import ClusterLaunch, cluster_attention_triton, cluster_means_triton

        launch = plan.launch(ClusterLaunch, None)
        if tail is None:
            return cluster_attention_triton(q, k, v, plan, scale, tail=None, launch=launch)
        means = cluster_means_triton(k, launch), cluster_means_triton(v, launch)  # the decision and the kernel
        gate = decide_cluster_tail(q, k, v, plan, scale, tail.probes, means)
        return cluster_attention_triton(q, k, v, plan, scale, tail=tail.name, gate=gate, means=means, launch=launch)
    if isinstance(plan, TokenPlan):
        from .triton_gather import token_sparse_attn

        launch = plan.launch(TokenLaunch, B, H)
        return token_sparse_attn(q, k, v, launch.perm, launch.kv_num_tokens, launch.kv_tokens, launch.block_size, scale)

    from .triton_blocksparse import block_sparse_attn

    launch = plan.launch(BlockLaunch, B, H)
    if tail is None:
        return block_sparse_attn(q, k, v, launch.perm, launch.kv_num_blocks, launch.kv_indices, launch.block_size,
                                 scale, launch.block_real, launch.order)
    from .triton_blocksparse import block_sparse_attn_tail

    s, kept, gate = tail_operands(summarize_tail, q, k, v, plan, tail, scale)
    return block_sparse_attn_tail(q, k, v, launch.perm, launch.kv_num_blocks, launch.kv_indices, launch.block_size,
                                  scale, launch.block_real, launch.order, s.keys, s.values, s.key_var, s.key_radius,
                                  s.log_count, kept, gate, s.per_block)


def _quant_attention(q, k, v, plan, scale, quant):
    from .triton_quant import quant_attention

    return quant_attention(q, k, v, plan, scale, quant)


register_quant_backends(
    "triton", _quant_attention, plans=(BlockPlan,), devices=_DEVICES, dtypes=(torch.float16, torch.bfloat16),
    head_dims=QUANT_HEAD_DIMS, priority=20, auto_devices=("cuda",), requires=_requires,
    int8=dict(block_sizes=BLOCK_SIZES, min_capability=(8, 0),
              description="8-bit Triton block-sparse: smoothed INT8 Q·Kᵀ per block (int32 acc), fp16 P·V; "
                          "permutation fused"),
    fp8=dict(block_sizes=FP8_BLOCK_SIZES, min_capability=(8, 9),
             description="8-bit Triton block-sparse: smoothed FP8 e4m3 Q·Kᵀ per block, e4m3 P·V; sm89+ "
                         "(Ada, Hopper)"),
)
