"""Block-sparse attention forward in Triton, with the tile permutation fused into loads and stores.

FlashAttention-2 style (online softmax, fp32 accumulation, ``exp2`` with ``log2(e)`` folded into the
scale), after the Triton fused-attention tutorial (``python/tutorials/06-fused-attention.py``).

One program computes one query block ``m`` of one ``(batch, head)``:

* its ``BLOCK_M == block_size`` query rows are loaded *through* ``perm[m*BS:(m+1)*BS]`` (the original
  token index of each tile-order slot; ``-1`` rows are padding and are neither loaded nor stored);
* it walks the plan's CSR row ``kv_indices[b, h, m, :kv_num_blocks[b, h, m]]`` and, for every kept
  key block, loads the ``block_size`` K/V rows through ``perm`` as well (split into
  ``BLOCK_SIZE // BLOCK_N`` sub-tiles; padding key slots get score ``-inf``);
* it stores its finished rows back to their ORIGINAL positions.

So no reordered copy of q, k, v or out is ever made, and no memory beyond the output is allocated.
The kernel never decides sparsity: the plan comes in as data (FlexAttention's ``kv_num_blocks`` /
``kv_indices`` vocabulary), possibly as expanded (stride-0) views, whose strides are passed as is.

Padding mask: padding slots sit at the end of a block (real tokens first, ``VideoLayout``'s
contract). Rather than a separate "full" and "partial" pass over the CSR row (which would need a
second, per-plan list of the blocks that hold padding), the one inner loop adds a per-column bias
(``0`` for real keys, ``-inf`` for padding) in the fused multiply-add that applies the softmax scale.
The bias compares the column offset with one scalar, the key block's real-slot count (``NB`` int32
computed by the launcher from ``perm``), so it is built directly in the accumulator's layout: it
costs 2-3.5% against no mask at all, where a bias built from the gathered ``perm`` values cost 13%
(a shared-memory round trip per tile). ``docs/kernel-notes.md`` has the measurements.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``NB`` blocks,
``BS`` block_size, ``S = NB * BS`` slots, ``K`` max kept blocks per query block.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["sparse_attention_triton", "block_sparse_attn"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------- inner loop
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  #
    k_base, v_base, perm_ptr, kvi_ptr, real_ptr,  #
    stride_kn, stride_kk, stride_vn, stride_vk, stride_kik,  #
    lo, hi, qk_scale,  #
    offs_n, offs_d,  #
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
    MASK_PADDING: tl.constexpr, NUM_STAGES: tl.constexpr,  #
):
    """Online softmax over the sub-tiles ``lo..hi`` of one CSR row (``SPLIT`` sub-tiles per kept block)."""
    SPLIT: tl.constexpr = BLOCK_SIZE // BLOCK_N
    d_mask = offs_d < HEAD_DIM
    for t in tl.range(lo, hi, num_stages=NUM_STAGES):
        if SPLIT == 1:
            n = tl.load(kvi_ptr + t * stride_kik)
            slot = n * BLOCK_SIZE + offs_n
        else:
            n = tl.load(kvi_ptr + (t // SPLIT) * stride_kik)
            slot = n * BLOCK_SIZE + (t % SPLIT) * BLOCK_N + offs_n
        tok = tl.load(perm_ptr + slot)  # int64 (BLOCK_N,), -1 = padding slot
        tok = tl.maximum(tok, 0)  # padding rows read token 0; their probabilities are 0
        # -- scores: K rows gathered through perm
        if HEAD_DIM == HEAD_DIM_P:
            k = tl.load(k_base + tok[:, None] * stride_kn + offs_d[None, :] * stride_kk)
        else:
            k = tl.load(k_base + tok[:, None] * stride_kn + offs_d[None, :] * stride_kk, mask=d_mask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k))
        if MASK_PADDING:
            # padding slots are the tail of a block: real iff slot offset < the block's real count
            # (a scalar, so the bias is built in the accumulator's layout with no shuffle)
            if SPLIT == 1:
                n_real = tl.load(real_ptr + n)
            else:
                n_real = tl.load(real_ptr + n) - (t % SPLIT) * BLOCK_N
            bias = tl.where(offs_n < n_real, 0.0, float("-inf"))
            qk = qk * qk_scale + bias[None, :]
        else:
            qk = qk * qk_scale
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
        p = tl.math.exp2(qk)
        l_ij = tl.sum(p, 1)
        alpha = tl.math.exp2(m_i - m_ij)
        acc = acc * alpha[:, None]
        # -- values
        if HEAD_DIM == HEAD_DIM_P:
            v = tl.load(v_base + tok[:, None] * stride_vn + offs_d[None, :] * stride_vk)
        else:
            v = tl.load(v_base + tok[:, None] * stride_vn + offs_d[None, :] * stride_vk, mask=d_mask[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + l_ij
        m_i = m_ij
    return acc, l_i, m_i


# --------------------------------------------------------------------------------------- autotune
def _configs():
    if _INTERPRET:  # the CPU interpreter runs every config: one small one (BLOCK_N=16 splits blocks > 16)
        return [triton.Config({"BLOCK_N": 16, "NUM_STAGES": 2}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_N": bn, "NUM_STAGES": s}, num_warps=w, num_stages=s)
        for bn in [64, 128]
        for s in [2, 3, 4]
        for w in [4, 8]
    ]


def keep(conf):
    """Configs worth timing (H100 sweep in docs/kernel-notes.md): 8 warps (two warpgroups over the
    128-row query tile) with 3-4 stages; one 4-warp, 2-stage config for small blocks and for GPUs
    with less shared memory (a config that does not fit is skipped by the autotuner)."""
    w, s = conf.num_warps, conf.num_stages
    return _INTERPRET or (w == 8 and s in (3, 4)) or (w == 4 and s == 2 and conf.kwargs["BLOCK_N"] == 64)


def _prune(configs, named_args, **kwargs):
    """BLOCK_N never exceeds the block; blocks of <= 64 slots use 4 warps."""
    bs = named_args["BLOCK_SIZE"] if "BLOCK_SIZE" in named_args else kwargs["BLOCK_SIZE"]
    out, seen = [], set()
    for c in configs:
        bn = min(c.kwargs["BLOCK_N"], bs)
        if bs <= 64 and c.num_warps > 4:
            continue
        key = (bn, c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config({**c.kwargs, "BLOCK_N": bn}, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


# --------------------------------------------------------------------------------------- kernel
@triton.autotune(
    configs=list(filter(keep, _configs())),
    key=["HEAD_DIM", "BLOCK_SIZE"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _sparse_attn_fwd(
    Q, K, V, Out, Perm, BlockReal, KVNum, KVIdx, Order, sm_scale,  #
    stride_qz, stride_qh, stride_qm, stride_qk,  #
    stride_kz, stride_kh, stride_kn, stride_kk,  #
    stride_vz, stride_vh, stride_vn, stride_vk,  #
    stride_oz, stride_oh, stride_om, stride_ok,  #
    stride_nbz, stride_nbh, stride_nbm,  #
    stride_kiz, stride_kih, stride_kim, stride_kik,  #
    H, NB,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,  #
    MASK_PADDING: tl.constexpr, NUM_STAGES: tl.constexpr,  #
):
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    tl.static_assert(HEAD_DIM_P >= HEAD_DIM)
    BLOCK_M: tl.constexpr = BLOCK_SIZE
    SPLIT: tl.constexpr = BLOCK_SIZE // BLOCK_N
    # Axis 0 walks one head's query blocks (they run together, sharing K/V in L2) in the launcher's
    # longest-row-first order, so a heavy row never starts last and runs alone.
    off_hz = tl.program_id(1)
    start_m = tl.load(Order + off_hz.to(tl.int64) * NB + tl.program_id(0))
    off_z = off_hz // H
    off_h = off_hz % H

    q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    k_base = K + off_z.to(tl.int64) * stride_kz + off_h.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_h.to(tl.int64) * stride_vh
    o_base = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
    kvi_ptr = KVIdx + off_z.to(tl.int64) * stride_kiz + off_h.to(tl.int64) * stride_kih + start_m.to(tl.int64) * stride_kim
    num = tl.load(KVNum + off_z.to(tl.int64) * stride_nbz + off_h.to(tl.int64) * stride_nbh + start_m.to(tl.int64) * stride_nbm)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_mask = offs_d < HEAD_DIM

    q_tok = tl.load(Perm + start_m.to(tl.int64) * BLOCK_SIZE + offs_m)  # int64 (BLOCK_M,)
    q_real = q_tok >= 0
    q_tok = tl.where(q_real, q_tok, 0)
    q_mask = q_real[:, None] & d_mask[None, :]
    q = tl.load(q_base + q_tok[:, None] * stride_qm + offs_d[None, :] * stride_qk, mask=q_mask, other=0.0)

    # m_i starts finite so that a sub-tile made only of padding slots yields p = 0, never NaN.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504  # 1/ln(2)

    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q,  #
        k_base, v_base, Perm, kvi_ptr, BlockReal,  #
        stride_kn, stride_kk, stride_vn, stride_vk, stride_kik,  #
        0, num * SPLIT, qk_scale,  #
        offs_n, offs_d,  #
        BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_P,  #
        MASK_PADDING, NUM_STAGES,  #
    )

    acc = acc / l_i[:, None]
    tl.store(o_base + q_tok[:, None] * stride_om + offs_d[None, :] * stride_ok, acc.to(Out.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------- launcher
def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    mask_padding: bool = True,
    block_real: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch ``_sparse_attn_fwd``. Assumes validated inputs (``sparsevid.sparse_attention`` checks them).

    Args:
        q, k, v (Tensor): ``(B, H, L, D)``, any strides, float16 / bfloat16 (float32 for tests),
            ``D`` in {64, 96, 128} (any ``D <= 256`` works; non powers of two are masked).
        perm (Tensor): int64 ``(S,)``, original token of each tile-order slot, ``-1`` = padding.
        kv_num_blocks (Tensor): int32 ``(B, H, NB)``; may be an expanded view.
        kv_indices (Tensor): int32 ``(B, H, NB, K)``, ascending in the first ``kv_num_blocks``
            entries; may be an expanded view.
        block_size (int): slots per block ``BS`` (16, 32, 64 or 128), the query tile.
        scale (float): softmax scale (usually ``D ** -0.5``).
        out (Tensor | None): optional ``(B, H, L, D)`` output to write (any strides).
        config (dict | None): bypass the autotuner, e.g. ``{"BLOCK_N": 64, "num_warps": 8,
            "num_stages": 3}`` (benchmarks and experiments).
        mask_padding (bool): ``False`` skips the padding-key bias; only valid when no slot is
            padding (experiments).
        block_real, order (Tensor | None): :func:`launch_tables` of this plan, when the caller keeps
            them with the plan (then a reused plan launches with no preparatory kernels).

    Returns:
        Tensor: ``(B, H, L, D)`` in the ORIGINAL token order, dtype of ``q``; strides like ``q``'s
        (``torch.empty_like``), so a transposed ``(B, L, H, D)`` input gives a ``(B, L, H, D)`` buffer.
    """
    if out is None:
        out = torch.empty_like(q)
    if block_real is None or order is None:
        block_real, order = launch_tables(perm, kv_num_blocks, block_size, q.shape[0], q.shape[1])
    grid, args, meta = _launch_args(q, k, v, out, perm, kv_num_blocks, kv_indices, block_size, scale, block_real,
                                    order, mask_padding)
    if config is None:
        _sparse_attn_fwd[grid](*args, **meta)
    else:
        _sparse_attn_fwd.fn[grid](*args, **meta, **_explicit(config, block_size))
    return out


def launch_tables(perm, kv_num_blocks, block_size: int, B: int, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_real, order)``: int32 real slots per block (padding is a block's tail, so the kernel masks
    keys by comparing a slot's offset with one scalar), and per (batch, head) the query blocks by
    kept-block count, descending (longest processing time first)."""
    NB = kv_num_blocks.shape[-1]
    block_real = (perm.view(NB, block_size) >= 0).sum(1, dtype=torch.int32)
    order = kv_num_blocks.expand(B, H, NB).reshape(B * H, NB).argsort(dim=1, descending=True).to(torch.int32)
    return block_real, order


def _launch_args(q, k, v, out, perm, kv_num_blocks, kv_indices, block_size, scale, block_real, order,
                 mask_padding=True):
    """``(grid, positional args, constexpr kwargs)`` of one launch; the grid uses shapes only."""
    B, H, L, D = q.shape
    NB = kv_num_blocks.shape[-1]
    grid = (NB, B * H)
    args = (
        q, k, v, out, perm, block_real, kv_num_blocks, kv_indices, order, float(scale),  #
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),  #
        *kv_num_blocks.stride(), *kv_indices.stride(),  #
        H, NB,  #
    )
    meta = dict(
        HEAD_DIM=D, HEAD_DIM_P=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=block_size, MASK_PADDING=mask_padding
    )
    return grid, args, meta


def _explicit(config: dict, block_size: int) -> dict:
    stages = config.get("num_stages", 2)
    return dict(
        BLOCK_N=min(config.get("BLOCK_N", block_size), block_size),
        NUM_STAGES=stages,
        num_warps=config.get("num_warps", 4),
        num_stages=stages,
    )


# --------------------------------------------------------------------------------------- custom op
@torch.library.custom_op("sparsevid::block_sparse_attn", mutates_args=())
def block_sparse_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float,
    block_real: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.sparsevid.block_sparse_attn``: :func:`sparse_attention_triton` as an opaque op.

    Traceable by ``torch.compile(fullgraph=True)`` (a fake kernel gives the output's shape and
    strides) and CUDA-graph capturable (no host syncs; the grid depends on shapes only). Run it
    once before capture so the autotuner has picked its config.
    """
    return sparse_attention_triton(q, k, v, perm, kv_num_blocks, kv_indices, block_size, scale,
                                   block_real=block_real, order=order)


@block_sparse_attn.register_fake
def _(q, k, v, perm, kv_num_blocks, kv_indices, block_size, scale, block_real=None, order=None):
    return torch.empty_like(q)


def _default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
