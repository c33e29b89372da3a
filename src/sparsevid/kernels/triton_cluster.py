"""Clustered attention forward in Triton: a :class:`~sparsevid.ClusterPlan` executed on q, k, v.

A clustered plan groups the video tokens per (batch, head) into query clusters and key clusters of
variable size (``q_order`` / ``q_offsets``, ``k_order`` / ``k_offsets``) and lists, per query cluster, the key
clusters it keeps (``kv_num_clusters`` / ``kv_clusters``, ascending). Text tokens are dense both ways.

One program computes one *tile*: up to ``BLOCK_M`` consecutive rows of one query cluster (loaded through
``q_order``). A work list of tiles, built on the device once per plan (:func:`cluster_launch`), cuts each
query cluster into ``ceil(n_c / BLOCK_M)`` tiles, so a small cluster costs one short tile, not a whole
fixed block; its length is bounded by ``Cq + ceil(V / BLOCK_M)`` (known from shapes: no host sync), and
programs past the real tiles exit at once. Tiles run longest first (kept key tokens per row, descending).

A program's online softmax (FlashAttention-2, fp32 state, base 2, :mod:`triton_common`) walks:

1. the text keys, one contiguous range of the original order;
2. the kept key clusters as token ranges of the cluster-sorted keys (adjacent kept clusters merged into one
   range once per plan), in ``BLOCK_N`` chunks, either *packed* (``packed=True``: the ranges end to end, each
   lane finding its range by a branch-free binary search over the ranges' packed ends, narrowed per chunk to the
   ranges it can touch by a coarse table, so only a row's last chunk is partial) or range by range (each range's
   last chunk masked). The keys are read through ``k_order`` (``gather_kv=False``) or from cluster-sorted copies of
   k and v made once per call (``gather_kv=True``: contiguous ranges);
3. with the cluster tail (``tail="centroid"``): every non-empty key cluster the row's query cluster does not
   keep, as one term with logit ``scale * q·k̄_j + log n_j + log w`` and value ``v̄_j`` (``log w``: the (batch,
   head)'s gate, one float load, decided before the launch by :func:`~sparsevid.tail.decide_cluster_tail`;
   ``-inf`` skips the scan; ``k̄_j`` / ``v̄_j``: this call's mean key and value, one launch of ``_cluster_means``
   each before the kernel, the twin of :func:`~sparsevid.cluster_plan.cluster_means`); all ``Ck`` clusters are
   scanned in
   ``BLOCK_T`` tiles against a keep mask, so the tail costs a ``Ck x D`` dot per row.

The finished rows are written to their ORIGINAL positions (through ``q_order``), in q's dtype. Text query
rows attend to every key: they are a separate dense pass (``scaled_dot_product_attention`` on the text
rows, written to their rows of the same output).

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``V`` video tokens, ``T`` text tokens,
``Cq`` / ``Ck`` query / key clusters, ``B'`` / ``H'`` the plan's batch / heads (equal to q's or 1),
``NT`` tiles, ``R`` kept ranges per query cluster (at most ``max_kept``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..cluster_plan import ClusterPlan
from ..plan import _describe
from .triton_common import INTERPRET, LOG2E, head_dim_padded, init_state, load_keys, load_rows, softmax_update, store_rows

__all__ = ["ClusterLaunch", "check_cluster_inputs", "cluster_attention_triton", "cluster_launch",
           "cluster_means_triton"]

BLOCK_T = 16 if INTERPRET else 64  # key clusters per tile of the tail scan
BLOCK_MS = (16, 32, 64, 128)  # query rows per tile that the kernel compiles for
# packed indices per entry of the packed walk's range table (ClusterLaunch.range_head): a chunk's search is narrowed
# to the ranges between two entries (a few where ranges hold tens of keys), for 4 bytes a query cluster per GRAIN keys
HEAD_GRAIN = 16 if INTERPRET else 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float32: tests (tl.dot in tf32 on a GPU)


@dataclass(frozen=True)
class ClusterLaunch:
    """What a launch of a clustered plan needs, derived once per plan (:func:`cluster_launch`). Contiguous
    tensors on the plan's device with leading dims ``(B', H')``.

    Attributes:
        tiles (Tensor): int32 ``(B', H', NT, 3)``: per tile its query cluster (``-1``: no tile, the program
            exits), first row and end row as positions in ``q_order``; longest first.
        range_num (Tensor): int32 ``(B', H', Cq)``: each query cluster's kept keys as merged ranges of positions in
            ``k_order`` (adjacent kept clusters one range), how many.
        range_cum, range_shift (Tensor): int32 ``(B', H', Cq, R)``, ``R`` the plan's ``max_kept``: the kept keys of a
            query cluster packed end to end (packed index ``p``): each range's end in packed indices (inclusive
            prefix sum of the lengths; ``2**31 - 1`` past ``range_num``), and ``start - packed start``, so a packed
            index ``p`` in range ``r`` is position ``p + range_shift[r]`` of ``k_order``, and range ``r`` is the
            positions ``[range_cum[r - 1] + range_shift[r], range_cum[r] + range_shift[r])`` (``range_cum[-1]``
            read as 0). Two tensors of the plan's width, no padding: the launch of a reused plan is held with it.
        range_head (Tensor): int16 (int32 from ``R = 2**15`` on) ``(B', H', Cq, NH)``: the range holding packed index
            ``g * HEAD_GRAIN`` (``range_num`` from the end of the kept keys on), ``NH = (V + 128) // HEAD_GRAIN + 2``:
            entries ``g`` and ``g'`` bound the ranges of every packed index between ``g * HEAD_GRAIN`` and
            ``g' * HEAD_GRAIN``.
        kept_num (Tensor): int32 ``(B', H', Cq)``: kept video keys per query cluster.
        kept (Tensor): uint8 ``(B', H', Cq, Ck)``: 1 where the query cluster keeps the key cluster.
        log_n (Tensor): float32 ``(B', H', Ck)``: log of each key cluster's size, ``-inf`` when empty.
        q_order, k_order (Tensor): int32 ``(B', H', V)``: the plan's orders.
        k_offsets (Tensor): int32 ``(B', H', Ck + 1)``: the plan's key cluster boundaries.
        block_m (int): query rows per tile.
        text_start, text_tokens (int): the text tokens' range in the original order.
    """

    plan_type: ClassVar[type] = ClusterPlan
    tiles: torch.Tensor
    range_num: torch.Tensor
    range_cum: torch.Tensor
    range_shift: torch.Tensor
    range_head: torch.Tensor
    kept_num: torch.Tensor
    kept: torch.Tensor
    log_n: torch.Tensor
    q_order: torch.Tensor
    k_order: torch.Tensor
    k_offsets: torch.Tensor
    block_m: int
    text_start: int
    text_tokens: int

    @classmethod
    def build(cls, plan: ClusterPlan, block_m: int | None = None) -> "ClusterLaunch":
        """``plan.launch(ClusterLaunch, block_m)``: built once per plan and tile height."""
        return cluster_launch(plan, block_m)


def cluster_launch(plan, block_m: int | None = None) -> ClusterLaunch:
    """The :class:`ClusterLaunch` of ``plan`` (a ClusterPlan, or any object with its fields) for tiles of
    ``block_m`` query rows (default: the smallest tile that holds ``plan.max_q_size`` where the plan knows it, else
    64, or 16 under the interpreter). Device ops only: no host sync."""
    bound = getattr(plan, "max_q_size", None)
    if block_m is None and bound is not None:
        block_m = next((b for b in BLOCK_MS if b >= bound), BLOCK_MS[-1])
    block_m = _block_m(block_m)
    layout = plan.layout
    q_offsets, k_offsets = plan.q_offsets.long(), plan.k_offsets.long()
    pb, ph, cq = q_offsets.shape[0], q_offsets.shape[1], q_offsets.shape[2] - 1
    ck = k_offsets.shape[-1] - 1
    dev = q_offsets.device

    # kept key clusters -> merged ranges of cluster-sorted positions (ids ascending: a cluster that starts
    # where the previous kept one ends continues its range)
    num = plan.kv_num_clusters.long()
    mk = plan.kv_clusters.shape[-1]
    live = torch.arange(mk, device=dev) < num[..., None]
    j = torch.where(live, plan.kv_clusters.long(), 0).clamp(0, max(ck - 1, 0))  # entries past the count: garbage
    bounds = k_offsets[..., None, :].expand(pb, ph, cq, ck + 1)
    starts, ends = bounds.gather(-1, j), bounds.gather(-1, j + 1)
    prev_end = torch.cat([torch.full_like(ends[..., :1], -1), ends[..., :-1]], -1)
    opens = live & (starts != prev_end)
    slot = torch.where(live, opens.cumsum(-1) - 1, mk)  # column mk: a dump for dead entries
    shape = (pb, ph, cq, mk + 1)
    r_start = torch.zeros(shape, dtype=torch.long, device=dev).scatter_(-1, torch.where(opens, slot, mk), starts)
    r_end = torch.zeros(shape, dtype=torch.long, device=dev).scatter_reduce_(-1, slot, ends, "amax")
    range_num = opens.sum(-1)
    in_use = torch.arange(mk, device=dev) < range_num[..., None]
    length = torch.where(in_use, r_end[..., :mk] - r_start[..., :mk], 0)
    cum = length.cumsum(-1)
    range_cum = torch.where(in_use, cum, 2**31 - 1).int().contiguous()
    range_shift = torch.where(in_use, r_start[..., :mk] - (cum - length), 0).int().contiguous()
    grain = torch.arange((layout.video_tokens + 128) // HEAD_GRAIN + 2, device=dev) * HEAD_GRAIN
    range_head = torch.searchsorted(range_cum, grain.expand(pb, ph, cq, -1).contiguous(), right=True)
    range_head = range_head.to(torch.int16 if mk < 2**15 else torch.int32)  # 12 MB a plan at Wan2.1-14B 720p
    kept = torch.zeros(pb, ph, cq, ck + 1, dtype=torch.uint8, device=dev)
    kept = kept.scatter_(-1, torch.where(live, j, ck), 1)[..., :ck].contiguous()

    # tiles: query cluster c is cut into ceil(n_c / block_m) tiles
    per = (q_offsets.diff(dim=-1) + block_m - 1) // block_m
    last = per.cumsum(-1)
    nt = cq + -(-layout.video_tokens // block_m)  # >= sum_c ceil(n_c / block_m)
    t = torch.arange(nt, device=dev).expand(pb, ph, nt).contiguous()
    c = torch.searchsorted(last.contiguous(), t, right=True)
    real = c < cq
    c = c.clamp_max(cq - 1)
    row0 = q_offsets.gather(-1, c) + (t - (last - per).gather(-1, c)) * block_m
    row_end = q_offsets.gather(-1, c + 1)
    work = torch.where(live, ends - starts, 0).sum(-1).gather(-1, c)  # kept key tokens of a tile's rows
    order = torch.where(real, work, -1).argsort(dim=-1, descending=True, stable=True)
    tiles = torch.stack([torch.where(real, c, -1), row0, row_end], -1).gather(2, order[..., None].expand(-1, -1, -1, 3))

    sizes = k_offsets.diff(dim=-1)
    log_n = torch.where(sizes > 0, sizes.clamp_min(1).float().log(), float("-inf"))
    text_start = 0 if layout.text_first else layout.video_tokens
    return ClusterLaunch(
        tiles.int().contiguous(), range_num.int().contiguous(), range_cum, range_shift, range_head,
        cum[..., -1].int().contiguous() if mk else range_num.int(), kept, log_n.contiguous(),
        plan.q_order.int().contiguous(), plan.k_order.int().contiguous(),
        plan.k_offsets.int().contiguous(), block_m, text_start, layout.text_tokens,
    )


# --------------------------------------------------------------------------------------- inner loops
@triton.jit
def _chunk(
    acc, l_i, m_i, q,  #
    k_base, v_base, idx_base, pos, ok, fallback,  #
    stride_kn, stride_kk, stride_vn, stride_vk, qk_scale, offs_d,  #
    GATHER: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
):
    """One online-softmax step over the keys at positions ``pos`` (lanes where ``ok`` is False masked out):
    rows ``idx_base[pos]`` of k/v with ``GATHER``, rows ``pos`` otherwise (masked lanes read row ``fallback``)."""
    if GATHER:
        tok = tl.load(idx_base + pos, mask=ok, other=0).to(tl.int64)
    else:
        tok = tl.where(ok, pos, fallback).to(tl.int64)
    k = load_keys(k_base, tok, stride_kn, stride_kk, offs_d, HEAD_DIM, HEAD_DIM_P)
    qk = tl.dot(q, tl.trans(k)) * qk_scale + tl.where(ok, 0.0, float("-inf"))[None, :]
    p, acc, l_i, m_i = softmax_update(acc, l_i, m_i, qk)
    v = load_keys(v_base, tok, stride_vn, stride_vk, offs_d, HEAD_DIM, HEAD_DIM_P)
    return tl.dot(p.to(v.dtype), v, acc), l_i, m_i


@triton.jit
def _range_inner(
    acc, l_i, m_i, q,  #
    k_base, v_base, idx_base, lo, hi,  #
    stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,  #
    offs_n, offs_d,  #
    GATHER: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
    NUM_STAGES: tl.constexpr,  #
):
    """Online softmax over the keys at positions ``lo..hi`` in ``BLOCK_N`` chunks (the last one masked): rows
    ``idx_base[pos]`` of k/v with ``GATHER``, rows ``pos`` otherwise."""
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        pos = start + offs_n
        ok = pos < hi
        acc, l_i, m_i = _chunk(acc, l_i, m_i, q, k_base, v_base, idx_base, pos, ok, lo,  #
                               stride_kn, stride_kk, stride_vn, stride_vk, qk_scale, offs_d,  #
                               GATHER, HEAD_DIM, HEAD_DIM_P)
    return acc, l_i, m_i


@triton.jit
def _packed_inner(
    acc, l_i, m_i, q,  #
    k_base, v_base, idx_base, cum_base, shift_base, head_base, total, R,  #
    stride_kn, stride_kk, stride_vn, stride_vk, qk_scale,  #
    offs_n, offs_d,  #
    GATHER: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
    LOG_R: tl.constexpr, GRAIN: tl.constexpr, NUM_STAGES: tl.constexpr,  #
):
    """Online softmax over a query cluster's ``total`` kept keys packed end to end across its ranges, in
    ``BLOCK_N`` chunks (only the last one masked): each lane finds its range by a branch-free binary search
    over the ranges' packed ends (``cum_base``, ``R <= 2**LOG_R`` entries; past them, read as past every
    ``p``), then its position in ``k_order``. The search starts at the range of the chunk's grain entry
    (``head_base``) and takes only the steps shorter than the chunk's window of ranges (the next entry past its end
    bounds it): the longer steps' loads are predicated off."""
    for start in tl.range(0, total, BLOCK_N, num_stages=NUM_STAGES):
        p = start + offs_n
        ok = p < total
        first = tl.load(head_base + start // GRAIN).to(tl.int32)
        window = tl.load(head_base + (start + BLOCK_N - 1) // GRAIN + 1).to(tl.int32) - first + 1  # ranges it can touch
        r = tl.zeros([BLOCK_N], dtype=tl.int32) + first
        for s in tl.static_range(LOG_R):
            half = 1 << (LOG_R - 1 - s)
            probe = r + (half - 1)
            end = tl.load(cum_base + probe, mask=probe < tl.where(window > half, R, 0), other=2**31 - 1)
            r = tl.where(end <= p, probe + 1, r)  # r = ranges ending at or before p
        acc, l_i, m_i = _chunk(acc, l_i, m_i, q, k_base, v_base, idx_base, p + tl.load(shift_base + r), ok, 0,  #
                               stride_kn, stride_kk, stride_vn, stride_vk, qk_scale, offs_d,  #
                               GATHER, HEAD_DIM, HEAD_DIM_P)
    return acc, l_i, m_i


@triton.jit
def _centroid_tail(
    acc, l_i, m_i, q,  #
    km_base, vm_base, logn_base, kept_base, CK, sm_scale, log_w, offs_d,  #
    BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,  #
):
    """The cluster tail: every non-empty key cluster not kept (``kept_base``: the query cluster's ``Ck`` flags)
    joins the softmax as one term, logit ``scale q·k̄ + log n + log w`` (natural units, converted to base 2), value
    ``v̄`` (``km_base`` / ``vm_base``: this call's means in q's dtype, contiguous ``(Ck, D)``)."""
    d_ok = offs_d < HEAD_DIM
    for j0 in tl.range(0, CK, BLOCK_T, num_stages=1):  # unpipelined: the kept keys' loop holds the shared memory
        offs_j = j0 + tl.arange(0, BLOCK_T)
        j_ok = offs_j < CK
        dropped = tl.load(kept_base + offs_j, mask=j_ok, other=1) == 0
        log_n = tl.load(logn_base + offs_j, mask=j_ok, other=float("-inf"))
        live = dropped & (log_n > float("-inf"))
        tile = offs_j[:, None] * HEAD_DIM + offs_d[None, :]
        tile_ok = j_ok[:, None] & d_ok[None, :]
        km = tl.load(km_base + tile, mask=tile_ok, other=0.0)
        z = (tl.dot(q, tl.trans(km)) * sm_scale + (log_n + log_w)[None, :]) * LOG2E
        z = tl.where(live[None, :], z, float("-inf"))
        p, acc, l_i, m_i = softmax_update(acc, l_i, m_i, z)
        vm = tl.load(vm_base + tile, mask=tile_ok, other=0.0)
        acc = tl.dot(p.to(vm.dtype), vm, acc)
    return acc, l_i, m_i


# --------------------------------------------------------------------------------------- cluster means
@triton.jit
def _cluster_means(
    V, KOrder, KOffsets, Out,  #
    stride_vz, stride_vh, stride_vn, stride_vk,  #
    H, PLAN_H, PLAN_Z_STEP, PLAN_H_STEP, NV, CK,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, ROWS: tl.constexpr,  #
):
    """One program per (key cluster, batch x head): the mean of the cluster's rows of ``V`` (k or v, read through
    ``k_order``), float32, into a contiguous ``(B, H, Ck, D)``."""
    j = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    off_z = bh // H
    off_h = bh % H
    pbh = off_z * PLAN_Z_STEP * PLAN_H + off_h * PLAN_H_STEP
    lo = tl.load(KOffsets + pbh * (CK + 1) + j)
    hi = tl.load(KOffsets + pbh * (CK + 1) + j + 1)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM_P)
    v_base = V + off_z * stride_vz + off_h * stride_vh
    acc = tl.zeros([ROWS, HEAD_DIM_P], dtype=tl.float32)
    for start in range(lo, hi, ROWS):
        pos = start + offs_r
        ok = pos < hi
        tok = tl.load(KOrder + pbh * NV + pos, mask=ok, other=0).to(tl.int64)
        acc += load_rows(v_base, tok, ok, stride_vn, stride_vk, offs_d, HEAD_DIM).to(tl.float32)
    mean = tl.sum(acc, 0) / tl.maximum(hi - lo, 1).to(tl.float32)
    tl.store(Out + (bh * CK + j) * HEAD_DIM + offs_d, mean, mask=offs_d < HEAD_DIM)


def cluster_means_triton(x: torch.Tensor, launch: ClusterLaunch) -> torch.Tensor:
    """:func:`~sparsevid.cluster_plan.cluster_means` (its PyTorch twin) in one launch: float32
    ``(B, H, Ck, D)``, contiguous, from ``x`` ``(B, H, L, D)`` (k or v, any strides) and the plan's key clusters."""
    B, H, _, D = x.shape
    pb, ph, nv = launch.k_order.shape
    ck = launch.k_offsets.shape[-1] - 1
    out = torch.empty(B, H, ck, D, dtype=torch.float32, device=x.device)
    _cluster_means[(ck, B * H)](
        x, launch.k_order, launch.k_offsets, out, *x.stride(), H, ph, int(pb > 1), int(ph > 1), nv, ck,  #
        HEAD_DIM=D, HEAD_DIM_P=head_dim_padded(D), ROWS=16 if INTERPRET else 32, num_warps=4,  #
    )
    return out


# --------------------------------------------------------------------------------------- autotune
def _configs():
    if INTERPRET:  # the CPU interpreter runs every config: one small one
        return [triton.Config({"BLOCK_N": 16, "NUM_STAGES": 1}, num_warps=4, num_stages=1)]
    # a short list (each config compiles at the first call of each key): short ranges favour small chunks
    return [triton.Config({"BLOCK_N": bn, "NUM_STAGES": s}, num_warps=w, num_stages=s)
            for bn, w, s in ((32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2))]


# --------------------------------------------------------------------------------------- kernel
@triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK_M", "TAIL", "PRE_GATHERED", "PACKED", "LOG_R"])
@triton.jit
def _cluster_attn_fwd(
    Q, K, V, Out, KG, VG, QOrder, KOrder, Tiles, RangeNum, RangeCum, RangeShift, RangeHead, KeptNum,  #
    Kept, LogN, KMeans, VMeans, Gate, sm_scale,  #
    stride_qz, stride_qh, stride_qm, stride_qk,  #
    stride_kz, stride_kh, stride_kn, stride_kk,  #
    stride_vz, stride_vh, stride_vn, stride_vk,  #
    stride_oz, stride_oh, stride_om, stride_ok,  #
    H, PLAN_H, PLAN_Z_STEP, PLAN_H_STEP, NV, NT, CQ, CK, R, NH, TEXT0, NTEXT,  #
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    BLOCK_T: tl.constexpr, TAIL: tl.constexpr, PRE_GATHERED: tl.constexpr, PACKED: tl.constexpr,  #
    LOG_R: tl.constexpr, GRAIN: tl.constexpr, NUM_STAGES: tl.constexpr,  #
):
    bh = tl.program_id(1).to(tl.int64)
    off_z = bh // H
    off_h = bh % H
    pbh = off_z * PLAN_Z_STEP * PLAN_H + off_h * PLAN_H_STEP  # the plan's (batch, head): steps of 0 broadcast
    tile = Tiles + (pbh * NT + tl.program_id(0)) * 3
    c = tl.load(tile).to(tl.int64)
    if c < 0:  # past the plan's real tiles
        return
    row0 = tl.load(tile + 1)
    row_end = tl.load(tile + 2)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    rows = row0 + offs_m
    q_real = rows < row_end
    q_tok = tl.load(QOrder + pbh * NV + rows, mask=q_real, other=0).to(tl.int64)
    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, q_tok, q_real, stride_qm, stride_qk, offs_d, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh

    acc, l_i, m_i = init_state(BLOCK_M, HEAD_DIM_P)
    # text keys: every row attends to all of them
    acc, l_i, m_i = _range_inner(
        acc, l_i, m_i, q, k_base, v_base, KOrder, TEXT0, TEXT0 + NTEXT,  #
        stride_kn, stride_kk, stride_vn, stride_vk, qk_scale, offs_n, offs_d,  #
        False, BLOCK_N, HEAD_DIM, HEAD_DIM_P, NUM_STAGES,  #
    )
    # kept key clusters, as merged ranges of cluster-sorted positions
    crow = pbh * CQ + c
    cum_base = RangeCum + crow * R
    shift_base = RangeShift + crow * R
    if PACKED:
        head_base = RangeHead + crow * NH
        if PRE_GATHERED:
            acc, l_i, m_i = _packed_inner(
                acc, l_i, m_i, q, KG + bh * NV * HEAD_DIM, VG + bh * NV * HEAD_DIM, KOrder, cum_base, shift_base,  #
                head_base, tl.load(KeptNum + crow), R, HEAD_DIM, 1, HEAD_DIM, 1, qk_scale, offs_n, offs_d,  #
                False, BLOCK_N, HEAD_DIM, HEAD_DIM_P, LOG_R, GRAIN, NUM_STAGES,  #
            )
        else:
            acc, l_i, m_i = _packed_inner(
                acc, l_i, m_i, q, k_base, v_base, KOrder + pbh * NV, cum_base, shift_base, head_base,  #
                tl.load(KeptNum + crow), R, stride_kn, stride_kk, stride_vn, stride_vk, qk_scale, offs_n, offs_d,  #
                True, BLOCK_N, HEAD_DIM, HEAD_DIM_P, LOG_R, GRAIN, NUM_STAGES,  #
            )
    else:  # range by range
        for r in range(0, tl.load(RangeNum + crow)):
            shift = tl.load(shift_base + r)
            lo = tl.load(cum_base + r - 1, mask=r > 0, other=0) + shift
            hi = tl.load(cum_base + r) + shift
            if PRE_GATHERED:  # contiguous (B, H, V, D) copies in cluster order
                acc, l_i, m_i = _range_inner(
                    acc, l_i, m_i, q, KG + bh * NV * HEAD_DIM, VG + bh * NV * HEAD_DIM, KOrder, lo, hi,  #
                    HEAD_DIM, 1, HEAD_DIM, 1, qk_scale, offs_n, offs_d,  #
                    False, BLOCK_N, HEAD_DIM, HEAD_DIM_P, NUM_STAGES,  #
                )
            else:
                acc, l_i, m_i = _range_inner(
                    acc, l_i, m_i, q, k_base, v_base, KOrder + pbh * NV, lo, hi,  #
                    stride_kn, stride_kk, stride_vn, stride_vk, qk_scale, offs_n, offs_d,  #
                    True, BLOCK_N, HEAD_DIM, HEAD_DIM_P, NUM_STAGES,  #
                )
    if TAIL:
        log_w = tl.load(Gate + bh)  # this (batch, head)'s decision on its tail
        if log_w > float("-inf"):
            acc, l_i, m_i = _centroid_tail(
                acc, l_i, m_i, q,  #
                KMeans + bh * CK * HEAD_DIM, VMeans + bh * CK * HEAD_DIM, LogN + pbh * CK, Kept + crow * CK, CK,  #
                sm_scale, log_w, offs_d, BLOCK_T, HEAD_DIM,  #
            )
    store_rows(Out + off_z * stride_oz + off_h * stride_oh, q_tok, q_real, acc, l_i, stride_om, stride_ok, offs_d,
               HEAD_DIM)


# --------------------------------------------------------------------------------------- launcher
def _block_m(block_m: int | None) -> int:
    if block_m is None:
        return 16 if INTERPRET else 64
    if block_m not in BLOCK_MS:
        raise ValueError(f"Expect block_m in {BLOCK_MS} but got {block_m!r}")
    return block_m


def check_cluster_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, tail=None, gate=None) -> None:
    """What the kernel can run: raises ``ValueError`` naming the argument (shapes, dtypes, head dim, devices,
    the plan's fields against the tensors, the tail's gate)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"Expect {name} to be a 4-D tensor (batch, heads, L, head_dim) but got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"Expect q, k, v of one shape but got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"Expect q, k, v of one dtype in {[str(d) for d in DTYPES]} but got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    B, H, L, D = q.shape
    if D % 16 or not 16 <= D <= 256:
        raise ValueError(f"Expect head_dim a multiple of 16 in [16, 256] for the clustered Triton kernel but got {D}")
    if q.device.type != "cuda" and not (INTERPRET and q.device.type == "cpu"):
        raise ValueError(f"Expect tensors on cuda (or cpu under TRITON_INTERPRET=1) but got {q.device}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"Expect q, k, v on one device but got {q.device}, {k.device}, {v.device}")
    if tail not in (None, "centroid"):
        raise ValueError(f"Expect tail in (None, 'centroid') for a clustered plan but got {tail!r}")
    if gate is not None and (tail is None or not isinstance(gate, torch.Tensor) or gate.dtype != torch.float32
                             or gate.shape != q.shape[:2] or gate.device != q.device):
        raise ValueError(f"Expect gate as a float32 (batch, heads) = {tuple(q.shape[:2])} tensor on {q.device} with "
                         f"tail='centroid' but got {_describe(gate)} with tail={tail!r}")
    layout = plan.layout
    if L != layout.num_tokens:
        raise ValueError(f"Expect q.shape[2] == layout.num_tokens = {layout.num_tokens} but got {L}")
    pb, ph, nv = plan.q_order.shape
    if pb not in (1, B) or ph not in (1, H):
        raise ValueError(f"Expect the plan's (batch, heads) in ({{1, {B}}}, {{1, {H}}}) for q of shape "
                         f"{tuple(q.shape)} but got ({pb}, {ph})")
    if nv != layout.video_tokens:
        raise ValueError(f"Expect plan.q_order.shape[-1] == layout.video_tokens = {layout.video_tokens} but got {nv}")
    if plan.k_means.shape[-1] != D:
        raise ValueError(f"Expect plan.k_means.shape[-1] == head_dim = {D} but got {plan.k_means.shape[-1]}")
    for name in ("q_order", "q_offsets", "k_order", "k_offsets", "kv_num_clusters", "kv_clusters", "k_means"):
        if getattr(plan, name).device != q.device:
            raise ValueError(f"Expect plan.{name} on {q.device} (q's device) but got {getattr(plan, name).device}")


def cluster_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    scale: float | None = None,
    *,
    tail: str | None = "centroid",
    gate: torch.Tensor | None = None,
    means: tuple[torch.Tensor, torch.Tensor] | None = None,
    launch: ClusterLaunch | None = None,
    block_m: int | None = None,
    gather_kv: bool = True,
    packed: bool = True,
    config: dict | None = None,
) -> torch.Tensor:
    """Execute a clustered plan.

    Args:
        q, k, v (Tensor): ``(B, H, L, D)``, any strides, float16 / bfloat16 (float32 for tests), ``D`` a
            multiple of 16 up to 256.
        plan: a ``ClusterPlan`` or any object with its fields (``layout``, ``q_order``, ``q_offsets``,
            ``k_order``, ``k_offsets``, ``kv_num_clusters``, ``kv_clusters``, ``k_means``) on q's device.
        scale (float | None): softmax scale, default ``D ** -0.5``.
        tail (str | None): ``"centroid"``: each dropped non-empty key cluster as one term; ``None``: dropped.
        gate (Tensor | None): float32 ``(B, H)``, contiguous: ``log w`` added to each (batch, head)'s centroid
            logits (``-inf``: its tail skipped), :func:`~sparsevid.tail.decide_cluster_tail`; ``None``: ``0``
            (the terms as they are).
        means (tuple | None): :func:`cluster_means_triton` of ``k`` and of ``v`` with this plan, when the caller
            built them (for the decision); ``None``: built here.
        launch (ClusterLaunch | None): :func:`cluster_launch` of this plan, when the caller keeps it with the plan.
        block_m (int | None): query rows per tile when ``launch`` is not given (16, 32, 64, 128).
        gather_kv (bool): read kept keys from cluster-sorted copies of k and v made by this call (contiguous
            ranges: 5.3 vs 5.8 ms through ``k_order`` at Wan2.1-1.3B 480p, density 0.1, H100,
            ``scripts/bench_cluster_kernel.py``).
        packed (bool): walk a query cluster's kept keys packed end to end across its ranges (only the last
            chunk masked) instead of range by range (each range's last chunk masked).
        config (dict | None): bypass the autotuner, e.g. ``{"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}``.

    Returns:
        Tensor: ``(B, H, L, D)`` in the ORIGINAL token order, q's dtype, strided like q (``empty_like``).
    """
    check_cluster_inputs(q, k, v, plan, tail, gate)
    launch = cluster_launch(plan, block_m) if launch is None else launch
    B, H, L, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.empty_like(q)
    t0, nt = launch.text_start, launch.text_tokens
    if nt:  # text rows: dense over every key
        out[:, :, t0:t0 + nt] = F.scaled_dot_product_attention(q[:, :, t0:t0 + nt], k, v, scale=scale)
    pb, ph, nv = launch.q_order.shape
    cq, ck = launch.kept.shape[-2:]
    if not tail:
        k_means = v_means = gate = q  # never read
    else:
        if means is None:
            means = cluster_means_triton(k, launch), cluster_means_triton(v, launch)
        for name, m in zip(("means[0]", "means[1]"), means):
            if m.shape != (B, H, ck, D) or m.dtype != torch.float32 or not m.is_contiguous() or m.device != q.device:
                raise ValueError(f"Expect {name} as a contiguous float32 {(B, H, ck, D)} tensor on {q.device} "
                                 f"(cluster_means_triton) but got {_describe(m)}")
        k_means, v_means = (m.to(q.dtype) for m in means)  # half the bytes of the tail scan; float32 stays for tests
        gate = torch.zeros(B, H, device=q.device) if gate is None else gate.contiguous()
    if gather_kv:
        index = launch.k_order.long()[..., None].expand(B, H, nv, D)
        kg, vg = torch.gather(k, 2, index).contiguous(), torch.gather(v, 2, index).contiguous()
    else:
        kg, vg = k, v  # never read
    grid = (launch.tiles.shape[2], B * H)
    args = (
        q, k, v, out, kg, vg, launch.q_order, launch.k_order, launch.tiles, launch.range_num,  #
        launch.range_cum, launch.range_shift, launch.range_head, launch.kept_num, launch.kept, launch.log_n,  #
        k_means, v_means, gate, scale,  #
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),  #
        H, ph, int(pb > 1), int(ph > 1), nv, launch.tiles.shape[2], cq, ck, launch.range_cum.shape[3],  #
        launch.range_head.shape[3], t0, nt,  #
    )
    meta = dict(HEAD_DIM=D, HEAD_DIM_P=head_dim_padded(D), BLOCK_M=launch.block_m, BLOCK_T=BLOCK_T,
                TAIL=tail is not None, PRE_GATHERED=gather_kv, PACKED=packed,
                LOG_R=(launch.range_cum.shape[-1] - 1).bit_length(), GRAIN=HEAD_GRAIN)
    if config is None:
        _cluster_attn_fwd[grid](*args, **meta)
    else:
        if config.get("BLOCK_N", 64) not in (16, 32, 64, 128):  # range_head is sized for chunks up to 128 keys
            raise ValueError(f"Expect config['BLOCK_N'] in (16, 32, 64, 128) but got {config['BLOCK_N']!r}")
        stages = config.get("num_stages", 2)
        _cluster_attn_fwd.fn[grid](*args, **meta, BLOCK_N=config.get("BLOCK_N", 64), NUM_STAGES=stages,
                                   num_warps=config.get("num_warps", 4), num_stages=stages)
    return out
