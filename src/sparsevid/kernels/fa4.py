"""The ``fa4`` backend: a ``BlockPlan`` on FlashAttention-4's block-sparse forward (Hopper, Blackwell).

FlashAttention-4 (``pip install flash-attn-4``: the CuTe-DSL FlashAttention, JIT-compiled on first
use, no CUDA toolchain needed) takes block sparsity in FlexAttention's CSR vocabulary — per
(batch, head, query block) a count and a list of key blocks — which is exactly a ``BlockPlan``'s
``kv_num_blocks`` / ``kv_indices``, over tensors in *tile order*. Its loads are TMA tile copies of
contiguous rows, so the permutation cannot be fused into them: q, k and v are gathered into tile
order (one row copy each) and the output is scattered back. Because the layout's tile order has no
padding inside the sequence, the gathered tensors are exactly ``L`` long and only a short last
block needs masking: FlashAttention-4 masks the sequence end of its *mask* blocks, so the plan is
split into "full" blocks (no mask work) and the last key block (a mask block) when it is short.
A plan that keeps every block (``plan.keeps_everything``, set by ``method="dense"``) skips the
gather and the block lists: attention is the same in any token order, so it runs
FlashAttention-4's dense kernel on the tensors as given.

Compilation: the first call of each (dtype, head dim, block size, broadcast pattern) compiles a
kernel (tens of seconds); FlashAttention-4 keeps it for the process, and on disk across processes
when ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` (``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR`` picks the
folder). ``python -m sparsevid bench kernel`` reports the first-call time.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``NB`` blocks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backends import register_backend
from ..plan import BlockPlan
from ..tail import tail_operands
from .triton_backend import summarize_tail

__all__ = ["fa4_attention"]


def _requires() -> str | None:
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        return "flash-attn-4 is not installed (pip install 'sparsevid[fa4]')"
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception as error:  # a broken install (missing CUDA libraries) must not break the CPU path
        return f"flash_attn.cute failed to import ({type(error).__name__}: {error})"
    return None


@dataclass(frozen=True)
class FA4Launch:
    """FlashAttention-4's block-sparse tensors of a ``BlockPlan`` (its ``BlockSparseTensorsTorch`` roles): the
    plan's CSR split into full key blocks and the short last key block. Built once per plan by :meth:`build`
    (``plan.launch(FA4Launch)``)."""

    plan_type: ClassVar[type] = BlockPlan
    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    mask_cnt: torch.Tensor
    mask_idx: torch.Tensor

    @classmethod
    def build(cls, plan: BlockPlan) -> "FA4Launch":
        layout = plan.layout
        counts, indices = plan.kv_num_blocks, plan.kv_indices
        if layout.num_tokens % layout.block_size == 0:  # no short block: every kept block is full
            return cls(counts, indices, torch.zeros_like(counts), indices[..., :1])
        has_last = plan.keeps_last_block().to(torch.int32)
        mask_idx = torch.full((*counts.shape, 1), layout.num_blocks - 1, dtype=torch.int32, device=counts.device)
        return cls(counts - has_last, indices, has_last, mask_idx)

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        """``(full_cnt, full_idx, mask_cnt, mask_idx)``, the kernel ops' argument order."""
        return self.full_cnt, self.full_idx, self.mask_cnt, self.mask_idx


@torch.library.custom_op("sparsevid::fa4_block_sparse_attn", mutates_args=())
def _fa4_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    full_cnt: torch.Tensor,
    full_idx: torch.Tensor,
    mask_cnt: torch.Tensor,
    mask_idx: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """FlashAttention-4 block-sparse on tile-ordered ``(B, H, L, D)`` tensors, read as ``(B, L, H, D)``
    views (no copy when their memory is ``(B, L, H, D)``, as diffusers' is); returns ``(B, H, L, D)``
    (a transposed view of ``(B, L, H, D)`` memory)."""
    out = _block_sparse_call(q, k, v, full_cnt, full_idx, mask_cnt, mask_idx, block_size, scale, return_lse=False)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _block_sparse_call(q, k, v, full_cnt, full_idx, mask_cnt, mask_idx, block_size, scale, return_lse):
    """``flash_attn_func`` with the plan's split CSR as FlashAttention-4's block-sparse tensors."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    sparse = BlockSparseTensorsTorch(
        mask_block_cnt=mask_cnt, mask_block_idx=mask_idx, full_block_cnt=full_cnt, full_block_idx=full_idx,
        block_size=(block_size, block_size),
    )
    return flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=scale, block_sparse_tensors=sparse,
                           return_lse=return_lse)


@_fa4_block_sparse.register_fake
def _(q, k, v, full_cnt, full_idx, mask_cnt, mask_idx, block_size, scale):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).transpose(1, 2)


@torch.library.custom_op("sparsevid::fa4_block_sparse_attn_lse", mutates_args=())
def _fa4_block_sparse_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    full_cnt: torch.Tensor,
    full_idx: torch.Tensor,
    mask_cnt: torch.Tensor,
    mask_idx: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``fa4_block_sparse_attn``, with FlashAttention-4's log-sum-exp of each row over its kept entries
    (natural log, float32 ``(B, H, L)``): the exact partial that the tail merges with."""
    out, lse = _block_sparse_call(q, k, v, full_cnt, full_idx, mask_cnt, mask_idx, block_size, scale, return_lse=True)
    return out.transpose(1, 2), lse


@_fa4_block_sparse_lse.register_fake
def _(q, k, v, full_cnt, full_idx, mask_cnt, mask_idx, block_size, scale):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).transpose(1, 2), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("sparsevid::fa4_dense_attn", mutates_args=())
def _fa4_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """FlashAttention-4 dense on ``(B, H, L, D)`` (read as ``(B, L, H, D)`` views); same return layout."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=scale)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


@_fa4_dense.register_fake
def _(q, k, v, scale):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).transpose(1, 2)


@register_backend(
    "fa4", plans=(BlockPlan,), devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), head_dims=(64, 96, 128),
    block_sizes=(64, 128), gpu_majors=(9, 10), priority=30, auto_devices=("cuda",), requires=_requires,
    summarize=summarize_tail,
    description="FlashAttention-4 block-sparse (CuTe DSL, Hopper/Blackwell) on gathered tile-order tensors",
)
def fa4_attention(q, k, v, plan, scale, tail=None):
    """``sparse_attention`` on FlashAttention-4 (validated inputs). With ``tail``, FlashAttention-4 runs
    as it is and returns its log-sum-exp; one Triton pass adds the skipped blocks' summary terms to each
    row (``triton_tail``), writing the merged rows to their original positions."""
    if plan.keeps_everything:  # nothing is skipped, so nothing to summarise
        return _fa4_dense(q, k, v, scale)
    layout = plan.layout
    tables = layout.on(q.device)
    split = plan.launch(FA4Launch).as_tuple()
    tiles = (q, k, v)
    if not layout.tiled:  # one row copy each into (B, L, H, D) tile order (the model's order otherwise)
        order = tables.perm[: layout.num_tokens]
        tiles = tuple(t.transpose(1, 2).index_select(1, order).transpose(1, 2) for t in (q, k, v))
    if tail is None:
        out = _fa4_block_sparse(*tiles, *split, plan.block_size, scale)
        return out if layout.tiled else out.transpose(1, 2).index_select(1, tables.inverse_perm).transpose(1, 2)
    from .triton_tail import tail_merge

    partial, lse = _fa4_block_sparse_lse(*tiles, *split, plan.block_size, scale)
    s, kept, gate = tail_operands(summarize_tail, q, k, v, plan, tail, scale)
    return tail_merge(tiles[0], partial, lse, tables.perm, s.keys, s.values, s.key_var, s.key_radius, s.log_count,
                      kept, gate, s.per_block, plan.block_size, scale, q)
