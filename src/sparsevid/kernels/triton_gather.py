"""M x 1 sparse attention forward in Triton: per query block, gather only the kept K/V token rows.

FG-Attn (arXiv 2509.16518) executed from a :class:`~sparsevid.token_plan.TokenPlan`. Same structure
as the block-sparse kernel (``triton_blocksparse.py``): FlashAttention-2 online softmax, fp32
accumulation, ``exp2`` with ``log2(e)`` folded into the scale, the tile permutation fused into the
query loads and output stores. One program computes one query block ``m`` of one ``(batch, head)``:

* its ``BLOCK_M == block_size`` query rows are loaded *through* ``perm[m*BS:(m+1)*BS]`` (``-1`` rows
  are padding: neither loaded nor stored);
* it walks the plan's CSR row ``kv_tokens[b, h, m, :kv_num_tokens[b, h, m]]`` in chunks of
  ``BLOCK_N`` ORIGINAL token indices and gathers those K and V rows by pointer (``tl.load`` with
  per-row offsets: each row is ``HEAD_DIM`` contiguous elements when the head dim has stride 1, so
  every gathered row is one coalesced transaction); ``tl.range(..., num_stages=NUM_STAGES)`` lets
  Triton software-pipeline the index load and the gathers (``cp.async`` on Ampere/Hopper) under
  the previous chunk's two matmuls;
* full chunks run unmasked; the one ragged tail chunk (``kv_num_tokens % BLOCK_N`` tokens) runs the
  same inner loop with a column mask — the "full, then partial" split of the Triton tutorial;
* it stores its finished rows back to their ORIGINAL positions.

No reordered copy of q, k, v or out is made; the plan comes in as data, possibly as expanded
(stride-0) views whose strides are passed as is. The kernel never decides sparsity.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``NB`` blocks,
``BS`` block_size, ``T`` max kept tokens per query block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_backend import BLOCK_SIZES
from .triton_common import (INTERPRET, LOG2E, check_tiling, head_dim_padded, init_state, load_keys, load_rows, query_rows,
                            softmax_update, store_rows)

__all__ = ["token_attention_triton", "token_sparse_attn"]


# --------------------------------------------------------------------------------------- inner loop
@triton.jit
def _gather_fwd_inner(
    acc, l_i, m_i, q,  #
    k_base, v_base, tok_ptr,  #
    stride_kn, stride_kk, stride_vn, stride_vk, stride_tk,  #
    lo, hi, num, listed, dense, qk_scale,  #
    offs_n, offs_d,  #
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
    MASKED: tl.constexpr, NUM_STAGES: tl.constexpr,  #
):
    """Online softmax over the kept tokens ``lo..hi`` (step ``BLOCK_N``); ``MASKED`` masks columns ``>= num``.

    ``dense``: the row keeps all ``L`` tokens, whose indices are not stored (key ``j`` is token ``j``);
    ``listed`` is then 0, else the stored list's width.
    """
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        cols = start + offs_n
        if MASKED:
            col_ok = cols < num
        tok = tl.load(tok_ptr + cols * stride_tk, mask=cols < listed, other=0)
        tok = tl.where(dense, cols, tok)
        if MASKED:
            tok = tl.where(col_ok, tok, 0)  # columns past the row's end read token 0 (their score is -inf)
        tok = tok.to(tl.int64)
        # -- scores: K rows gathered by original token index
        k = load_keys(k_base, tok, stride_kn, stride_kk, offs_d, HEAD_DIM, HEAD_DIM_P)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            qk = qk * qk_scale + tl.where(col_ok, 0.0, float("-inf"))[None, :]
        else:
            qk = qk * qk_scale
        p, acc, l_i, m_i = softmax_update(acc, l_i, m_i, qk)
        # -- values
        v = load_keys(v_base, tok, stride_vn, stride_vk, offs_d, HEAD_DIM, HEAD_DIM_P)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


# --------------------------------------------------------------------------------------- autotune
def _configs():
    if INTERPRET:  # the CPU interpreter runs every config: one small one
        return [triton.Config({"BLOCK_N": 16, "NUM_STAGES": 2}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_N": bn, "NUM_STAGES": s}, num_warps=w, num_stages=s)
        for bn in [32, 64, 128]
        for s in [2, 3, 4]
        for w in [4, 8]
    ]


def keep(conf):
    """Drop configs that cannot help: 128-wide gathers with 4 stages overflow shared memory at D=128."""
    return not (conf.kwargs["BLOCK_N"] == 128 and conf.kwargs["NUM_STAGES"] == 4)


def _prune(configs, named_args, **kwargs):
    bs = named_args["BLOCK_SIZE"] if "BLOCK_SIZE" in named_args else kwargs["BLOCK_SIZE"]
    return [c for c in configs if not (bs <= 32 and c.num_warps > 4)] or configs[:1]


# --------------------------------------------------------------------------------------- kernel
@triton.autotune(
    configs=list(filter(keep, _configs())),
    key=["HEAD_DIM", "BLOCK_SIZE"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _gather_attn_fwd(
    Q, K, V, Out, Perm, KVNum, KVTok, sm_scale,  #
    stride_qz, stride_qh, stride_qm, stride_qk,  #
    stride_kz, stride_kh, stride_kn, stride_kk,  #
    stride_vz, stride_vh, stride_vn, stride_vk,  #
    stride_oz, stride_oh, stride_om, stride_ok,  #
    stride_nz, stride_nh, stride_nm,  #
    stride_tz, stride_th, stride_tm, stride_tk,  #
    H, L, WIDTH,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,  #
    NUM_STAGES: tl.constexpr,  #
):
    tl.static_assert(HEAD_DIM_P >= HEAD_DIM)
    BLOCK_M: tl.constexpr = BLOCK_SIZE
    start_m = tl.program_id(0)  # query block (fastest: one head's blocks run together, sharing K/V in L2)
    off_hz = tl.program_id(1)
    off_z = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    m64 = start_m.to(tl.int64)

    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    o_base = Out + off_z * stride_oz + off_h * stride_oh
    tok_ptr = KVTok + off_z * stride_tz + off_h * stride_th + m64 * stride_tm
    num = tl.load(KVNum + off_z * stride_nz + off_h * stride_nh + m64 * stride_nm)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    q_tok, q_real = query_rows(Perm, start_m, offs_m, BLOCK_SIZE)
    q = load_rows(q_base, q_tok, q_real, stride_qm, stride_qk, offs_d, HEAD_DIM)
    acc, l_i, m_i = init_state(BLOCK_M, HEAD_DIM_P)
    qk_scale = sm_scale * LOG2E

    dense = num == L  # a row that keeps every token stores no indices
    listed = tl.where(dense, 0, WIDTH)
    full = (num // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _gather_fwd_inner(
        acc, l_i, m_i, q,  #
        k_base, v_base, tok_ptr,  #
        stride_kn, stride_kk, stride_vn, stride_vk, stride_tk,  #
        0, full, num, listed, dense, qk_scale,  #
        offs_n, offs_d,  #
        BLOCK_N, HEAD_DIM, HEAD_DIM_P,  #
        False, NUM_STAGES,  #
    )
    if full < num:
        acc, l_i, m_i = _gather_fwd_inner(
            acc, l_i, m_i, q,  #
            k_base, v_base, tok_ptr,  #
            stride_kn, stride_kk, stride_vn, stride_vk, stride_tk,  #
            full, num, num, listed, dense, qk_scale,  #
            offs_n, offs_d,  #
            BLOCK_N, HEAD_DIM, HEAD_DIM_P,  #
            True, 1,  #
        )

    store_rows(o_base, q_tok, q_real, acc, l_i, stride_om, stride_ok, offs_d, HEAD_DIM)


# --------------------------------------------------------------------------------------- launcher
def token_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    kv_num_tokens: torch.Tensor,
    kv_tokens: torch.Tensor,
    block_size: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch ``_gather_attn_fwd``. Assumes validated inputs (``sparsevid.sparse_attention`` checks them).

    Args:
        q, k, v (Tensor): ``(B, H, L, D)``, any strides, float16 / bfloat16 (float32 for tests),
            ``D`` in {64, 96, 128} (any ``D <= 256`` works; non powers of two are masked).
        perm (Tensor): int64 ``(S,)``, original token of each tile-order slot, ``-1`` = padding.
        kv_num_tokens (Tensor): int32 ``(B, H, NB)``; may be an expanded view. A row of ``L`` keeps
            every token and reads no index.
        kv_tokens (Tensor): int32 ``(B, H, NB, T)``, original token indices, ascending in the first
            ``kv_num_tokens`` entries; may be an expanded view.
        block_size (int): slots per block ``BS`` (16, 32, 64 or 128), the query tile.
        scale (float): softmax scale.
        out (Tensor | None): optional ``(B, H, L, D)`` output to write (any strides).
        config (dict | None): bypass the autotuner, e.g. ``{"BLOCK_N": 64, "num_warps": 8,
            "num_stages": 3}`` (benchmarks and experiments).

    Returns:
        Tensor ``(B, H, L, D)`` in the ORIGINAL token order, dtype of ``q``, strides like ``q``'s.
    """
    check_tiling("the Triton gather kernel", block_size, BLOCK_SIZES, q.shape[-1])
    if out is None:
        out = torch.empty_like(q)
    grid, args, meta = _launch_args(q, k, v, out, perm, kv_num_tokens, kv_tokens, block_size, scale)
    if config is None:
        _gather_attn_fwd[grid](*args, **meta)
    else:
        stages = config.get("num_stages", 2)
        _gather_attn_fwd.fn[grid](
            *args, **meta, BLOCK_N=config.get("BLOCK_N", 64), NUM_STAGES=stages,
            num_warps=config.get("num_warps", 4), num_stages=stages,
        )
    return out


def _launch_args(q, k, v, out, perm, kv_num_tokens, kv_tokens, block_size, scale):
    """``(grid, positional args, constexpr kwargs)`` of one launch; the grid uses shapes only."""
    B, H, L, D = q.shape
    NB = kv_num_tokens.shape[-1]
    grid = (NB, B * H)
    args = (
        q, k, v, out, perm, kv_num_tokens, kv_tokens, float(scale),  #
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),  #
        *kv_num_tokens.stride(), *kv_tokens.stride(),  #
        H, L, kv_tokens.shape[-1],  #
    )
    meta = dict(HEAD_DIM=D, HEAD_DIM_P=head_dim_padded(D), BLOCK_SIZE=block_size)
    return grid, args, meta


# --------------------------------------------------------------------------------------- custom op
@torch.library.custom_op("sparsevid::token_sparse_attn", mutates_args=())
def token_sparse_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    kv_num_tokens: torch.Tensor,
    kv_tokens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """``torch.ops.sparsevid.token_sparse_attn``: :func:`token_attention_triton` as an opaque op.

    Traceable by ``torch.compile(fullgraph=True)`` (the fake kernel gives the output's shape and
    strides) and CUDA-graph capturable (no host syncs; the grid depends on shapes only). Run it
    once before capture so the autotuner has picked its config.
    """
    return token_attention_triton(q, k, v, perm, kv_num_tokens, kv_tokens, block_size, scale)


@token_sparse_attn.register_fake
def _(q, k, v, perm, kv_num_tokens, kv_tokens, block_size, scale):
    return torch.empty_like(q)
