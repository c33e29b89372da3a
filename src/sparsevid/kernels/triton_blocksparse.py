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

A ring step (:mod:`sparsevid.parallel.ring`) runs the same kernel with a query chunk's and a key chunk's own
tables: ``KPerm`` (the key slots, ``-1`` outside the key chunk) beside ``Perm`` (the query slots), and
``RETURN_LSE`` to write each row's log-sum-exp next to its output (zeros and ``-inf`` where a row
computes nothing), the partial the ring merges.

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


import torch
import triton
import triton.language as tl

from ..tail import TailSummaries, fixed_gate
from .triton_backend import BLOCK_SIZES
from .triton_common import (INTERPRET, LOG2E, check_tiling, head_dim_padded, init_state, kept_tile, load_keys,
                            load_rows, query_rows, softmax_update, store_rows)
from .triton_tail import BLOCK_T, tail_inner

__all__ = ["sparse_attention_triton", "block_sparse_attn", "block_sparse_attn_tail"]



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
    """Online softmax over the sub-tiles ``lo..hi`` of one CSR row (``BLOCK_SIZE // BLOCK_N`` per kept block)."""
    for t in tl.range(lo, hi, num_stages=NUM_STAGES):
        n, slot0, bias = kept_tile(kvi_ptr, real_ptr, t, stride_kik, offs_n, BLOCK_SIZE, BLOCK_N, MASK_PADDING)
        tok = tl.load(perm_ptr + slot0 + offs_n)  # int64 (BLOCK_N,), -1 = padding slot
        tok = tl.maximum(tok, 0)  # padding rows read token 0; their probabilities are 0
        # -- scores: K rows gathered through perm; the padding bias rides the scale's multiply-add
        k = load_keys(k_base, tok, stride_kn, stride_kk, offs_d, HEAD_DIM, HEAD_DIM_P)
        qk = tl.dot(q, tl.trans(k)) * qk_scale + bias[None, :]
        p, acc, l_i, m_i = softmax_update(acc, l_i, m_i, qk)
        # -- values
        v = load_keys(v_base, tok, stride_vn, stride_vk, offs_d, HEAD_DIM, HEAD_DIM_P)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


# --------------------------------------------------------------------------------------- autotune
def _configs():
    if INTERPRET:  # the CPU interpreter runs every config: one small one (BLOCK_N=16 splits blocks > 16)
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
    return INTERPRET or (w == 8 and s in (3, 4)) or (w == 4 and s == 2 and conf.kwargs["BLOCK_N"] == 64)


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
    key=["HEAD_DIM", "BLOCK_SIZE", "TAIL", "RETURN_LSE"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _sparse_attn_fwd(
    Q, K, V, Out, Perm, KPerm, Lse, BlockReal, KVNum, KVIdx, Order, sm_scale,  #
    KS, VS, KVar, KRad, LogN, Kept, Gate,  #
    stride_qz, stride_qh, stride_qm, stride_qk,  #
    stride_kz, stride_kh, stride_kn, stride_kk,  #
    stride_vz, stride_vh, stride_vn, stride_vk,  #
    stride_oz, stride_oh, stride_om, stride_ok,  #
    stride_nbz, stride_nbh, stride_nbm,  #
    stride_kiz, stride_kih, stride_kim, stride_kik,  #
    stride_kpz, stride_kph, stride_kpm, stride_kpn,  #
    stride_lz, stride_lh, stride_lm,  #
    H, NB, NS,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,  #
    MASK_PADDING: tl.constexpr, NUM_STAGES: tl.constexpr,  #
    TAIL: tl.constexpr, PER_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, RETURN_LSE: tl.constexpr,  #
):
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    tl.static_assert(HEAD_DIM_P >= HEAD_DIM)
    BLOCK_M: tl.constexpr = BLOCK_SIZE
    SPLIT: tl.constexpr = BLOCK_SIZE // BLOCK_N
    # Axis 0 walks one head's query blocks (they run together, sharing K/V in L2) in the launcher's
    # longest-row-first order, so a heavy row never starts last and runs alone.
    off_hz = tl.program_id(1)
    start_m = tl.load(Order + off_hz.to(tl.int64) * NB + tl.program_id(0))
    off_z = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    m64 = start_m.to(tl.int64)

    kvi_ptr = KVIdx + off_z * stride_kiz + off_h * stride_kih + m64 * stride_kim
    num = tl.load(KVNum + off_z * stride_nbz + off_h * stride_nbh + m64 * stride_nbm)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    q_tok, q_real = query_rows(Perm, start_m, offs_m, BLOCK_SIZE)
    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, q_tok, q_real, stride_qm, stride_qk, offs_d, HEAD_DIM)

    acc, l_i, m_i = init_state(BLOCK_M, HEAD_DIM_P)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q,  #
        K + off_z * stride_kz + off_h * stride_kh, V + off_z * stride_vz + off_h * stride_vh, KPerm, kvi_ptr,  #
        BlockReal,  #
        stride_kn, stride_kk, stride_vn, stride_vk, stride_kik,  #
        0, num * SPLIT, sm_scale * LOG2E,  #
        offs_n, offs_d,  #
        BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_P,  #
        MASK_PADDING, NUM_STAGES,  #
    )
    if TAIL:  # the skipped blocks' summary terms join the same softmax, unless the call's decision drops them
        bh = off_hz.to(tl.int64)
        summary = bh * NS * HEAD_DIM
        if tl.load(Gate + bh * 2) > float("-inf"):
            acc, l_i, m_i = tail_inner(
                acc, l_i, m_i, q,  #
                KS + summary, VS + summary, KVar + summary, KRad + bh * NS, LogN,  #
                Kept + off_z * stride_kpz + off_h * stride_kph + m64 * stride_kpm, stride_kpn,  #
                Gate + bh * 2, NS, sm_scale, offs_d,  #
                PER_BLOCK, BLOCK_T, HEAD_DIM, HEAD_DIM_P,  #
            )
    o_base = Out + off_z * stride_oz + off_h * stride_oh
    if RETURN_LSE:  # a row that computed nothing (a ring step's empty row) stores 0 and -inf, not 0/0
        has = l_i > 0
        l_i = tl.where(has, l_i, 1.0)
        lse = tl.where(has, (m_i + tl.math.log2(l_i)) / LOG2E, float("-inf"))
        tl.store(Lse + off_z * stride_lz + off_h * stride_lh + q_tok * stride_lm, lse, mask=q_real)
    store_rows(o_base, q_tok, q_real, acc, l_i, stride_om, stride_ok, offs_d, HEAD_DIM)


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
    tail: TailSummaries | None = None,
    kept: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    key_perm: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        tail (TailSummaries | None): summaries from :func:`sparsevid.kernels.triton_tail.summarize_triton`:
            each query block's skipped key groups join its softmax (after its kept blocks);
            ``kept`` is then the plan as a bool block mask ``(B, H, NB, NS // PER_BLOCK)`` (expanded views
            welcome) and ``gate`` each head's decision, float32 contiguous ``(B, H, 2)``
            (:func:`sparsevid.tail.decide_tail`; ``None``: the summaries as they are).
        key_perm (Tensor | None): int64 ``(NBk * BS,)``: the key token (a row of k, which may have another
            length) of each slot of the key blocks ``kv_indices`` addresses, ``-1`` = padding at the end
            of a block; ``None``: ``perm``. ``block_real`` then counts ``key_perm``'s blocks.
        return_lse (bool): also return each row's natural-log log-sum-exp, float32 ``(B, H, L)``; the
            output is then float32 too (a ring step's partial, see :mod:`sparsevid.parallel.ring`).

    Returns:
        Tensor: ``(B, H, L, D)`` in the ORIGINAL token order, dtype of ``q``; strides like ``q``'s
        (``torch.empty_like``), so a transposed ``(B, L, H, D)`` input gives a ``(B, L, H, D)`` buffer.
        With ``return_lse``: ``(out, lse)``.
    """
    B, H, L, D = q.shape
    check_tiling("the Triton block-sparse kernel", block_size, BLOCK_SIZES, D)
    lse = None
    if return_lse:
        out = torch.empty_like(q, dtype=torch.float32) if out is None else out
        lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    elif out is None:
        out = torch.empty_like(q)
    if block_real is None or order is None:
        block_real, order = launch_tables(perm, kv_num_blocks, block_size, B, H)
        if key_perm is not None:
            block_real = (key_perm.view(-1, block_size) >= 0).sum(1, dtype=torch.int32)
    grid, args, meta = _launch_args(q, k, v, out, perm, kv_num_blocks, kv_indices, block_size, scale, block_real,
                                    order, mask_padding, tail, kept, gate, key_perm, lse)
    if config is None:
        _sparse_attn_fwd[grid](*args, **meta)
    else:
        _sparse_attn_fwd.fn[grid](*args, **meta, **_explicit(config, block_size))
    return (out, lse) if return_lse else out


def launch_tables(perm, kv_num_blocks, block_size: int, B: int, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_real, order)``: int32 real slots per block (padding is a block's tail, so the kernel masks
    keys by comparing a slot's offset with one scalar), and per (batch, head) the query blocks by
    kept-block count, descending (longest processing time first)."""
    NB = kv_num_blocks.shape[-1]
    block_real = (perm.view(NB, block_size) >= 0).sum(1, dtype=torch.int32)
    order = kv_num_blocks.expand(B, H, NB).reshape(B * H, NB).argsort(dim=1, descending=True).to(torch.int32)
    return block_real, order


def _launch_args(q, k, v, out, perm, kv_num_blocks, kv_indices, block_size, scale, block_real, order,
                 mask_padding=True, tail=None, kept=None, gate=None, key_perm=None, lse=None):
    """``(grid, positional args, constexpr kwargs)`` of one launch; the grid uses shapes only."""
    B, H, L, D = q.shape
    NB = kv_num_blocks.shape[-1]
    grid = (NB, B * H)
    if tail is None:  # the tail's pointers are never read: any tensor stands in
        summaries, kept_strides, ns, per_block = (q,) * 7, (0, 0, 0, 0), 0, 1
    else:
        kept_u8 = kept.view(torch.uint8)
        gate = fixed_gate(B, H, q.device) if gate is None else gate
        summaries = (tail.keys, tail.values, tail.key_var, tail.key_radius, tail.log_count, kept_u8, gate)
        kept_strides, ns, per_block = kept_u8.stride(), tail.keys.shape[2], tail.per_block
    args = (
        q, k, v, out, perm, perm if key_perm is None else key_perm, q if lse is None else lse,  #
        block_real, kv_num_blocks, kv_indices, order, float(scale),  #
        *summaries,  #
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),  #
        *kv_num_blocks.stride(), *kv_indices.stride(),  #
        *kept_strides,  #
        *(lse.stride() if lse is not None else (0, 0, 0)),  #
        H, NB, ns,  #
    )
    meta = dict(HEAD_DIM=D, HEAD_DIM_P=head_dim_padded(D), BLOCK_SIZE=block_size, MASK_PADDING=mask_padding,
                TAIL=tail is not None, PER_BLOCK=per_block, BLOCK_T=BLOCK_T, RETURN_LSE=lse is not None)
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


@torch.library.custom_op("sparsevid::block_sparse_attn_tail", mutates_args=())
def block_sparse_attn_tail(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float,
    block_real: torch.Tensor,
    order: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_var: torch.Tensor,
    key_radius: torch.Tensor,
    log_count: torch.Tensor,
    kept: torch.Tensor,
    gate: torch.Tensor,
    per_block: int,
) -> torch.Tensor:
    """``torch.ops.sparsevid.block_sparse_attn_tail``: the same kernel with the tail's summary terms in its
    softmax (the summaries' tensors of :class:`~sparsevid.tail.TailSummaries`; ``kept`` the plan as a
    bool block mask; ``gate`` each head's decision, :func:`sparsevid.tail.decide_tail`)."""
    tail = TailSummaries(keys, values, log_count, key_var, key_radius, per_block)
    return sparse_attention_triton(q, k, v, perm, kv_num_blocks, kv_indices, block_size, scale,
                                   block_real=block_real, order=order, tail=tail, kept=kept, gate=gate)


@block_sparse_attn_tail.register_fake
def _(q, k, v, perm, kv_num_blocks, kv_indices, block_size, scale, block_real, order, keys, values, key_var,
      key_radius, log_count, kept, gate, per_block):
    return torch.empty_like(q)

