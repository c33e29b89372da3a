"""The tail decision in Triton: a few exact query rows per (batch, head), attended over every key and, in the same
pass, over the keys their plan keeps (the twin of :func:`sparsevid.tail.probe_partials_reference`); for the cluster
tail, the whole decision after it in one more launch (the twin of :func:`sparsevid.tail.decide_cluster_tail`'s
PyTorch path).

:func:`~sparsevid.tail.decide_tail` and :func:`~sparsevid.tail.decide_cluster_tail` judge each call's tail on
``P`` probe rows (32 a head): the exact output, and the output and log-sum-exp of the kept keys alone. In PyTorch
that is float32 matmuls of ``P`` rows against chunks of upcast keys, which cuBLAS runs on CUDA cores with small
tiles (1.3 ms a call at Wan2.1-1.3B 480p on an H100, more than the probe's arithmetic by two orders of magnitude).
Here one launch streams k and v once, in their own dtype on tensor cores with float32 accumulation, and keeps two
online softmaxes (FlashAttention-2, base 2, :mod:`triton_common`): all keys, and the kept ones. What a row keeps
comes in two small tables, read per key: the key groups each row keeps (tile plans: key blocks; clustered plans:
key clusters) and the group of each key, never a ``(P, L)`` mask (at Wan2.1-14B 720p that mask was 97 MB a plan).

Parallelism: ``B x H`` programs would leave most of the GPU idle, so the keys are split into ``S`` ranges
(flash-decoding's split-KV); each program writes its range's two partials (output and log-sum-exp), merged by their
log-sum-exp: in PyTorch by :func:`probe_partials_triton`, or inside :func:`_cluster_decide`, which also computes the
rows' centroid terms and scores the options (dropping, and each weight of :data:`sparsevid.tail.TAIL_WEIGHTS`) per
(batch, head): the ~58 small PyTorch kernels of that decision (counted on the CPU) become one launch.

Shape legend: ``B`` batch, ``H`` heads, ``P`` probe rows, ``L`` keys, ``D`` head dim, ``S`` key ranges, ``B'`` /
``H'`` the keep tables' batch / heads (equal to q's or 1), ``G`` key groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tail import LOG_WEIGHT_STEP, TAIL_WEIGHTS, check_probe_tables
from .triton_common import INTERPRET, LOG2E, head_dim_padded, init_state, load_keys, softmax_update

__all__ = ["decide_cluster_triton", "probe_partials_triton", "takes"]

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


@triton.jit
def _merge_splits(Out, Lse, which, bh, BH, P, S, offs_p, p_ok, offs_d, d_ok, HEAD_DIM: tl.constexpr,
                  BLOCK_P: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    """The probe pass's ``S`` key ranges of partial ``which`` (0: all keys, 1: kept) merged by their natural-log
    log-sum-exps (flash-decoding's combine): ``(out, lse)``, a row with no mass zero with ``-inf``."""
    acc = tl.zeros([BLOCK_P, HEAD_DIM_P], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_P], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_P], dtype=tl.float32) + float("-inf")
    for s in range(S):
        slot = ((s * 2 + which) * BH + bh) * P + offs_p
        lse = tl.load(Lse + slot, mask=p_ok, other=float("-inf"))
        out = tl.load(Out + slot[:, None] * HEAD_DIM + offs_d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, lse)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - base)
        beta = tl.exp(lse - base)
        acc = acc * alpha[:, None] + out * beta[:, None]
        l_i = l_i * alpha + beta
        m_i = m_new
    safe = tl.where(l_i > 0, l_i, 1.0)
    return acc / safe[:, None], tl.where(l_i > 0, m_i + tl.log(safe), float("-inf"))


@triton.jit
def _squared_error(kept_out, kept_lse, tail_out, tail_lse, exact, row_ok):
    """Summed squared error to ``exact`` of the kept partial merged with the tail's (``tail_lse`` already shifted
    by ``log w``; ``merge_partials``' rule: a row empty in both stays zero)."""
    m = tl.maximum(kept_lse, tail_lse)
    safe_m = tl.where(m == float("-inf"), 0.0, m)
    lse = safe_m + tl.log(tl.exp(kept_lse - safe_m) + tl.exp(tail_lse - safe_m))
    base = tl.where(m == float("-inf"), 0.0, lse)
    merged = tl.exp(kept_lse - base)[:, None] * kept_out + tl.exp(tail_lse - base)[:, None] * tail_out
    err = tl.where(row_ok[:, None], merged - exact, 0.0)
    return tl.sum(tl.sum(err * err, 1), 0)


@triton.jit
def _cluster_decide(
    Q, Out, Lse, KMeans, VMeans, LogN, Kept, Weight, Errors, sm_scale,  #
    stride_qz, stride_qh, stride_qm, stride_qk,  #
    stride_nz, stride_nh, stride_nc,  #
    stride_mz, stride_mh, stride_mm, stride_mc,  #
    H, P, CK, S, LOG_STEP,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,  #
    WEIGHTS: tl.constexpr,  #
):
    """One program per (batch, head): the cluster tail's decision from the probe pass's partials (``Out``,
    ``Lse``: ``S`` key ranges, unmerged), the centroid terms of the probe rows ``Q`` (this call's mean keys and
    values ``KMeans`` / ``VMeans``, float32 ``(B, H, Ck, D)``; ``log n`` ``LogN``; the rows' kept clusters
    ``Kept``), and the option nearest the exact rows: ``Errors`` ``(B, H, 1 + WEIGHTS)`` (dropping, then weight
    ``w`` at ``1 + w``) and ``Weight`` ``(B, H)``, ``w * LOG_STEP`` of the first minimum (``-inf``: drop)."""
    bh = tl.program_id(0).to(tl.int64)
    off_z = bh // H
    off_h = bh % H
    BH = tl.num_programs(0)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, HEAD_DIM_P)
    p_ok = offs_p < P
    d_ok = offs_d < HEAD_DIM
    exact, _ = _merge_splits(Out, Lse, 0, bh, BH, P, S, offs_p, p_ok, offs_d, d_ok, HEAD_DIM, BLOCK_P, HEAD_DIM_P)
    kept_out, kept_lse = _merge_splits(Out, Lse, 1, bh, BH, P, S, offs_p, p_ok, offs_d, d_ok, HEAD_DIM, BLOCK_P,
                                       HEAD_DIM_P)

    # the centroid terms of the rows' dropped, non-empty key clusters: one online softmax (base 2)
    q = tl.load(Q + off_z * stride_qz + off_h * stride_qh + offs_p[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                mask=p_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    acc, l_i, m_i = init_state(BLOCK_P, HEAD_DIM_P)
    n_base = LogN + off_z * stride_nz + off_h * stride_nh
    m_base = Kept + off_z * stride_mz + off_h * stride_mh + offs_p[:, None] * stride_mm
    for j0 in range(0, CK, BLOCK_T):
        offs_j = j0 + tl.arange(0, BLOCK_T)
        j_ok = offs_j < CK
        tile = (bh * CK + offs_j)[:, None] * HEAD_DIM + offs_d[None, :]
        tile_ok = j_ok[:, None] & d_ok[None, :]
        km = tl.load(KMeans + tile, mask=tile_ok, other=0.0)
        log_n = tl.load(n_base + offs_j * stride_nc, mask=j_ok, other=float("-inf"))
        kept = tl.load(m_base + offs_j[None, :] * stride_mc, mask=p_ok[:, None] & j_ok[None, :], other=1) != 0
        z = (tl.dot(q, tl.trans(km), input_precision="ieee") * sm_scale + log_n[None, :]) * LOG2E
        z = tl.where(kept | (log_n == float("-inf"))[None, :], float("-inf"), z)
        p, acc, l_i, m_i = softmax_update(acc, l_i, m_i, z)
        vm = tl.load(VMeans + tile, mask=tile_ok, other=0.0)
        acc = tl.dot(p, vm, acc, input_precision="ieee")
    safe = tl.where(l_i > 0, l_i, 1.0)
    tail_out = acc / safe[:, None]
    tail_lse = tl.where(l_i > 0, (m_i + tl.math.log2(safe)) / LOG2E, float("-inf"))  # natural log, as the probe's

    # the options: drop (the kept partial alone), then the terms with weight w = 2^(-k/2); the first minimum wins
    err = tl.where(p_ok[:, None], kept_out - exact, 0.0)
    best_err = tl.sum(tl.sum(err * err, 1), 0)
    tl.store(Errors + bh * (1 + WEIGHTS), best_err)
    best = -1
    for w in tl.static_range(WEIGHTS):
        e = _squared_error(kept_out, kept_lse, tail_out, tail_lse + w * LOG_STEP, exact, p_ok)
        tl.store(Errors + bh * (1 + WEIGHTS) + 1 + w, e)
        better = e < best_err
        best = tl.where(better, w, best)
        best_err = tl.where(better, e, best_err)
    tl.store(Weight + bh, tl.where(best < 0, float("-inf"), best * LOG_STEP))


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
    check_probe_tables(kept_groups, key_groups, B, H, P, L)
    out, lse = _probe_splits(qp, k, v, kept_groups, key_groups, scale)
    total = torch.logsumexp(lse, dim=0)  # (2, B * H, P): the ranges merged by their log-sum-exp
    weight = torch.exp(lse - torch.where(torch.isinf(total), 0.0, total))  # a row with no mass: weights 0
    merged = (weight.unsqueeze(-1) * out).sum(0).view(2, B, H, P, D)
    total = total.view(2, B, H, P)
    return merged[0], merged[1], total[1]


def _probe_splits(qp, k, v, kept_groups, key_groups, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe kernel's launch: float32 ``(S, 2, B * H, P, D)`` outputs and ``(S, 2, B * H, P)`` log-sum-exps of
    each key range (``S`` ranges; all keys, then the kept ones), unmerged."""
    B, H, P, D = qp.shape
    L = k.shape[2]
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
    return out, lse


def decide_cluster_triton(qp: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept_clusters: torch.Tensor,
                          key_clusters: torch.Tensor, means: tuple[torch.Tensor, torch.Tensor], log_n: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The cluster tail's decision in two launches (the twin of :func:`sparsevid.tail.decide_cluster_tail`'s
    PyTorch path): the probe pass, then :func:`_cluster_decide` per (batch, head).

    Args:
        qp (Tensor): ``(B, H, P, D)`` in k's dtype: the probe rows.
        k, v (Tensor): ``(B, H, L, D)``.
        kept_clusters, key_clusters (Tensor): the rows' kept key clusters and each key's cluster
            (:func:`probe_partials_triton`'s ``kept_groups`` / ``key_groups``).
        means (tuple): float32 contiguous ``(B, H, Ck, D)`` mean keys and mean values of this call.
        log_n (Tensor): float32 ``(B', H', Ck)``: log of each key cluster's size, ``-inf`` when empty.
        scale (float): softmax scale.

    Returns:
        ``(log_weight, errors)``: float32 ``(B, H)`` (``-inf``: drop) and ``(B, H, 1 + W)``, ``W`` the weights of
        :data:`sparsevid.tail.TAIL_WEIGHTS` (what each option scored, :func:`sparsevid.tail.option_errors`' order).
    """
    B, H, P, D = qp.shape
    check_probe_tables(kept_clusters, key_clusters, B, H, P, k.shape[2])
    k_means, v_means = means
    ck = kept_clusters.shape[-1]
    for name, m in (("means[0]", k_means), ("means[1]", v_means)):
        if m.shape != (B, H, ck, D) or m.dtype != torch.float32 or not m.is_contiguous():
            raise ValueError(f"Expect {name} as a contiguous float32 {(B, H, ck, D)} tensor but got {m.dtype} "
                             f"{tuple(m.shape)}")
    if log_n.dtype != torch.float32 or log_n.dim() != 3 or log_n.shape[-1] != ck:
        raise ValueError(f"Expect log_n as a float32 (B', H', {ck}) tensor but got {log_n.dtype} {tuple(log_n.shape)}")
    out, lse = _probe_splits(qp, k, v, kept_clusters, key_clusters, scale)
    table = kept_clusters.expand(B, H, P, ck)
    log_n = log_n.expand(B, H, ck)
    weight = torch.empty(B, H, dtype=torch.float32, device=qp.device)
    errors = torch.empty(B, H, 1 + len(TAIL_WEIGHTS), dtype=torch.float32, device=qp.device)
    _cluster_decide[(B * H,)](
        qp, out, lse, k_means, v_means, log_n, table, weight, errors, scale,  #
        *qp.stride(), *log_n.stride(), *table.stride(),  #
        H, P, ck, out.shape[0], LOG_WEIGHT_STEP,  #
        HEAD_DIM=D, HEAD_DIM_P=head_dim_padded(D), BLOCK_P=max(16, triton.next_power_of_2(P)),
        BLOCK_T=16 if INTERPRET else 64, WEIGHTS=len(TAIL_WEIGHTS), num_warps=4,
    )
    return weight, errors
