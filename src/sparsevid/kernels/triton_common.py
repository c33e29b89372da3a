"""The pieces every sparsevid attention kernel shares: query rows through the permutation, the CSR
walk over a plan row's kept key blocks, the online-softmax update, and the finished rows' store.

Kernels (``triton_blocksparse``, ``triton_quant``, ``triton_gather``, ``triton_tail``) call these
``@triton.jit`` functions, so a fix to the softmax or to the padding mask is made once. Conventions
of all of them: FlashAttention-2 online softmax in base 2 (``log2(e)`` folded into the scale), fp32
state, ``m_i`` starting finite (``-1e30``) so that a tile of masked columns gives ``p = 0``, never NaN.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .triton_backend import MAX_HEAD_DIM

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # the CPU interpreter: small configs, fp16 only
LOG2E = tl.constexpr(1.4426950408889634)  # 1 / ln(2): scores in base 2, so the kernels exponentiate with exp2


@triton.jit
def query_rows(Perm, start_m, offs_m, BLOCK_SIZE: tl.constexpr):
    """``(q_tok, q_real)``: the original token of each of query block ``start_m``'s slots (padding
    slots read token 0) and whether the slot is real."""
    q_tok = tl.load(Perm + start_m.to(tl.int64) * BLOCK_SIZE + offs_m)  # int64, -1 = padding slot
    q_real = q_tok >= 0
    return tl.where(q_real, q_tok, 0), q_real


@triton.jit
def load_rows(base, tok, rows_ok, stride_n, stride_k, offs_d, HEAD_DIM: tl.constexpr):
    """Rows ``tok`` of a ``(L, D)`` matrix at ``base`` (zeros where ``rows_ok`` is False or past ``HEAD_DIM``)."""
    mask = rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(base + tok[:, None] * stride_n + offs_d[None, :] * stride_k, mask=mask, other=0.0)


@triton.jit
def load_keys(base, tok, stride_n, stride_k, offs_d, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    """Rows ``tok`` (all valid) of a ``(L, D)`` matrix: the inner loops' K/V loads, unmasked when the head
    dim fills the tile (no predicate on the hot path)."""
    ptrs = base + tok[:, None] * stride_n + offs_d[None, :] * stride_k
    if HEAD_DIM == HEAD_DIM_P:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def init_state(BLOCK_M: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    """``(acc, l_i, m_i)`` of an empty softmax."""
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    return acc, l_i, m_i


@triton.jit
def kept_tile(kvi_ptr, real_ptr, t, stride_kik, offs_n, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK_PADDING: tl.constexpr):
    """Sub-tile ``t`` of a CSR row walked in ``BLOCK_N`` slots (``BLOCK_SIZE // BLOCK_N`` per kept block):
    ``(n, slot0, bias)`` — its key block, first slot, and the score bias of its columns (``-inf`` on the
    padding slots that end a short block: padding is a block's tail, so one scalar, the block's real
    count, tells them; 0 elsewhere, or everywhere without ``MASK_PADDING``)."""
    SPLIT: tl.constexpr = BLOCK_SIZE // BLOCK_N
    if SPLIT == 1:
        n = tl.load(kvi_ptr + t * stride_kik)
        slot0 = n.to(tl.int64) * BLOCK_SIZE
        first = 0
    else:
        n = tl.load(kvi_ptr + (t // SPLIT) * stride_kik)
        first = (t % SPLIT) * BLOCK_N
        slot0 = n.to(tl.int64) * BLOCK_SIZE + first
    if MASK_PADDING:
        bias = tl.where(offs_n < tl.load(real_ptr + n) - first, 0.0, float("-inf"))
    else:
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    return n, slot0, bias


@triton.jit
def softmax_update(acc, l_i, m_i, qk):
    """One online-softmax step over scores ``qk`` (base 2, scaled and masked): ``(p, acc, l_i, m_i)``
    with ``acc`` already rescaled; the caller adds ``p @ v`` to it."""
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    return p, acc * alpha[:, None], l_i * alpha + tl.sum(p, 1), m_ij


@triton.jit
def store_rows(o_base, q_tok, q_real, acc, l_i, stride_om, stride_ok, offs_d, HEAD_DIM: tl.constexpr):
    """``acc / l_i`` to the rows' ORIGINAL positions (padding slots not written)."""
    mask = q_real[:, None] & (offs_d < HEAD_DIM)[None, :]
    out = acc / l_i[:, None]
    tl.store(o_base + q_tok[:, None] * stride_om + offs_d[None, :] * stride_ok, out.to(o_base.dtype.element_ty),
             mask=mask)


def check_tiling(kernel: str, block_size: int | None = None, block_sizes: tuple[int, ...] = (),
                 head_dim: int | None = None, head_dims: tuple[int, ...] | None = None) -> None:
    """Raise a ``ValueError`` before a launch that ``kernel`` cannot tile: a block size outside ``block_sizes`` or a
    head dim outside ``head_dims`` (``None``: 1 to ``MAX_HEAD_DIM``; a size given as ``None`` is not checked, padded to a power of two). A launch past its
    tiles reads and writes out of bounds, which poisons the process's CUDA context."""
    if block_size is not None and block_size not in block_sizes:
        raise ValueError(f"Expect block_size in {tuple(block_sizes)} for {kernel} but got {block_size}")
    if head_dim is not None and not (head_dim in head_dims if head_dims is not None else 1 <= head_dim <= MAX_HEAD_DIM):
        allowed = tuple(head_dims) if head_dims is not None else f"1..{MAX_HEAD_DIM}"
        raise ValueError(f"Expect head_dim in {allowed} for {kernel} but got {head_dim}")


def head_dim_padded(head_dim: int) -> int:
    """The power-of-two tile width (>= 16) that holds ``head_dim`` channels."""
    return max(16, triton.next_power_of_2(head_dim))
