"""The tail decision's probe rows in Triton: a few exact query rows per (batch, head), attended over every key and,
in the same pass, over the keys their plan keeps. The twin of :func:`sparsevid.tail.probe_partials_reference`.

:func:`~sparsevid.tail.decide_tail` and :func:`~sparsevid.tail.decide_cluster_tail` judge each call's tail on
``P`` probe rows (32 a head): the exact output, and the output and log-sum-exp of the kept keys alone. What a row
keeps comes in two small tables, read per key in the kernel: the key groups each row keeps (tile plans: key blocks;
clustered plans: key clusters) and the group of each key, never a ``(P, L)`` mask (at Wan2.1-14B 720p that mask is
97 MB a plan). In PyTorch
that is float32 matmuls of ``P`` rows against chunks of upcast keys, which cuBLAS runs on CUDA cores with small
tiles (1.3 ms a call at Wan2.1-1.3B 480p on an H100, more than the probe's arithmetic by two orders of magnitude).
Here one launch streams k and v once, in their own dtype on tensor cores with float32 accumulation, and keeps two
online softmaxes (FlashAttention-2, base 2, :mod:`triton_common`): all keys, and the kept ones.

Parallelism: ``B x H`` programs would leave most of the GPU idle, so the keys are split into ``S`` ranges
(flash-decoding's split-KV); each program writes its range's two partials (output and log-sum-exp), and
:func:`probe_partials_triton` merges them by their log-sum-exp.

Shape legend: ``B`` batch, ``H`` heads, ``P`` probe rows, ``L`` keys, ``D`` head dim, ``S`` key ranges, ``B'`` /
``H'`` the keep tables' batch / heads (equal to q's or 1), ``G`` key groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, LOG2E, head_dim_padded, init_state, load_keys, softmax_update

__all__ = ["check_groups", "probe_partials_triton", "takes"]

_BLOCK_N = 16 if INTERPRET else 64  # keys per step
_PROGRAMS = 512  # programs to aim for (a few per SM): the key ranges per (batch, head)


@triton.jit
def _probe_fwd(
    Q, K, V, Kept, Group, Out, Lse, sm_scale,  #
    stride_qz, stride_qh, stride_qm, stride_qk,  #
    stride_kz, stride_kh, stride_kn, stride_kk,  #
    stride_vz, stride_vh, stride_vn, stride_vk,  #
    stride_mz, stride_mh, stride_mm, stride_mg,  #
    stride_gz, stride_gh, stride_gn,  #
    H, P, L, KEYS_PER_SPLIT,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,  #
):
    split = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    off_z = bh // H
    off_h = bh % H
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    p_ok = offs_p < P
    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_p[:, None] * stride_qm + offs_d[None, :] * stride_qk
    q = tl.load(q_ptrs, mask=p_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    m_base = Kept + off_z * stride_mz + off_h * stride_mh + offs_p[:, None] * stride_mm  # strides 0: broadcast
    g_base = Group + off_z * stride_gz + off_h * stride_gh
    qk_scale = sm_scale * LOG2E

    acc_all, l_all, m_all = init_state(BLOCK_P, HEAD_DIM_P)
    acc_kept, l_kept, m_kept = init_state(BLOCK_P, HEAD_DIM_P)
    lo = split * KEYS_PER_SPLIT
    hi = tl.minimum(lo + KEYS_PER_SPLIT, L)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        tok = tl.where(col_ok, cols, lo).to(tl.int64)  # lanes past the range read a valid row, masked below
        k = load_keys(k_base, tok, stride_kn, stride_kk, offs_d, HEAD_DIM, HEAD_DIM_P)
        v = load_keys(v_base, tok, stride_vn, stride_vk, offs_d, HEAD_DIM, HEAD_DIM_P)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
        group = tl.load(g_base + cols * stride_gn, mask=col_ok, other=-1)
        every = group < 0  # a key every row keeps (text keys of a clustered plan)
        kept = tl.load(m_base + group[None, :] * stride_mg, mask=p_ok[:, None] & (col_ok & ~every)[None, :], other=0)
        kept = (kept != 0) | every[None, :]
        p, acc_all, l_all, m_all = softmax_update(acc_all, l_all, m_all, qk)
        acc_all = tl.dot(p.to(v.dtype), v, acc_all)
        p, acc_kept, l_kept, m_kept = softmax_update(acc_kept, l_kept, m_kept, tl.where(kept, qk, float("-inf")))
        acc_kept = tl.dot(p.to(v.dtype), v, acc_kept)

    # partials of this key range: outputs (zero where nothing entered) and natural-log log-sum-exps (-inf)
    rows = ((split * 2) * tl.num_programs(1) + bh) * P + offs_p  # (S, 2, B * H, P) slots
    half = tl.num_programs(1) * P
    out_mask = p_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    for which in tl.static_range(2):
        acc = acc_all if which == 0 else acc_kept
        l_i = l_all if which == 0 else l_kept
        m_i = m_all if which == 0 else m_kept
        slot = rows + which * half
        safe = tl.where(l_i > 0, l_i, 1.0)
        tl.store(Out + slot[:, None] * HEAD_DIM + offs_d[None, :], acc / safe[:, None], mask=out_mask)
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(safe)) / LOG2E, float("-inf"))
        tl.store(Lse + slot, lse, mask=p_ok)


def takes(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel tiles this head dim (a multiple of 16 up to 256) and dtype."""
    return head_dim % 16 == 0 and 16 <= head_dim <= 256 and dtype in (torch.float16, torch.bfloat16, torch.float32)


def probe_partials_triton(qp: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept_groups: torch.Tensor,
                          key_groups: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(exact, kept_out, kept_lse)`` of the probe rows ``qp`` ``(B, H, P, D)`` (k's dtype): float32 ``(B, H, P,
    D)`` their attention over every key of ``k``, ``v`` ``(B, H, L, D)`` (any strides), float32 ``(B, H, P, D)``
    and ``(B, H, P)`` their partial over the keys they keep and its natural-log log-sum-exp (``-inf`` for a row
    that keeps no key, whose output is zero). Row ``p`` keeps key ``n`` where ``key_groups[n] < 0`` or
    ``kept_groups[p, key_groups[n]]`` (bool ``(B', H', P, G)`` and integer ``(B', H', L)``, each broadcasting to
    q's batch and heads)."""
    B, H, P, D = qp.shape
    L = k.shape[2]
    if qp.dtype != k.dtype or v.dtype != k.dtype:
        raise ValueError(f"Expect qp, k, v of one dtype but got {qp.dtype}, {k.dtype}, {v.dtype}")
    if not takes(D, k.dtype):
        raise ValueError(f"Expect head_dim a multiple of 16 in [16, 256] and a float dtype for the probe kernel but "
                         f"got {D} and {k.dtype}")
    check_groups(kept_groups, key_groups, B, H, P, L)
    # read in place (expanded dims have stride 0); the bool table as bool: no uint8 view, which torch.compile
    # cannot lower
    table = kept_groups.expand(B, H, P, kept_groups.shape[-1])
    groups = key_groups.expand(B, H, L)
    blocks = triton.cdiv(L, _BLOCK_N)
    splits = max(1, min(blocks, triton.cdiv(_PROGRAMS, B * H)))
    per_split = triton.cdiv(blocks, splits) * _BLOCK_N
    splits = triton.cdiv(L, per_split)
    out = torch.empty(splits, 2, B * H, P, D, dtype=torch.float32, device=qp.device)
    lse = torch.empty(splits, 2, B * H, P, dtype=torch.float32, device=qp.device)
    _probe_fwd[(splits, B * H)](
        qp, k, v, table, groups, out, lse, scale,  #
        *qp.stride(), *k.stride(), *v.stride(), *table.stride(), *groups.stride(),  #
        H, P, L, per_split,  #
        HEAD_DIM=D, HEAD_DIM_P=head_dim_padded(D), BLOCK_P=max(16, triton.next_power_of_2(P)), BLOCK_N=_BLOCK_N,
        num_warps=4, num_stages=2,
    )
    total = torch.logsumexp(lse, dim=0)  # (2, B * H, P): the ranges merged by their log-sum-exp
    weight = torch.exp(lse - torch.where(torch.isinf(total), 0.0, total))  # a row with no mass: weights 0
    merged = (weight.unsqueeze(-1) * out).sum(0).view(2, B, H, P, D)
    total = total.view(2, B, H, P)
    return merged[0], merged[1], total[1]


def check_groups(kept_groups: torch.Tensor, key_groups: torch.Tensor, B: int, H: int, P: int, L: int) -> None:
    """The keep tables of ``P`` probe rows over ``L`` keys for ``(B, H)``: ``ValueError`` naming the argument."""
    if (kept_groups.dtype != torch.bool or kept_groups.dim() != 4 or kept_groups.shape[2] != P
            or kept_groups.shape[0] not in (1, B) or kept_groups.shape[1] not in (1, H)):
        raise ValueError(f"Expect kept_groups as a bool (B' in (1, {B}), H' in (1, {H}), {P}, G) tensor but got "
                         f"{kept_groups.dtype} {tuple(kept_groups.shape)}")
    if (key_groups.dtype not in (torch.int32, torch.int64) or key_groups.dim() != 3 or key_groups.shape[2] != L
            or key_groups.shape[0] not in (1, B) or key_groups.shape[1] not in (1, H)):
        raise ValueError(f"Expect key_groups as an int32 / int64 (B' in (1, {B}), H' in (1, {H}), {L}) tensor but got "
                         f"{key_groups.dtype} {tuple(key_groups.shape)}")
