"""The tail in Triton: summaries of k and v (one pass), and the summary terms of a query block's
skipped key groups in its online softmax (:mod:`sparsevid.tail` defines them).

* ``_summarize``: one program per (group, batch x head) reads the group's k and v rows through
  ``perm`` and writes the mean key, the mean value, and the keys' per-channel variance and radius
  ``max_t |k_t - k̄|`` (a second read of the same rows, from L2).
* :func:`tail_inner`: the loop over summary tiles, the same online-softmax step as the exact
  blocks. The ``triton`` backend runs it inside the block-sparse kernel, after the kept blocks
  (``triton_blocksparse``), so the tail costs no extra pass over q or the output.
* ``_tail_merge``: for a backend that computes the exact part elsewhere (FlashAttention-4, whose
  output and log-sum-exp it takes): the softmax state starts from that partial (``acc = O``,
  ``l = 1``, ``m = lse · log2(e)``, the kernels' scores being in base 2: the flash-decoding split-KV
  merge, written as a starting state), runs
  :func:`tail_inner`, and writes the merged rows back to their original positions — the scatter
  out of tile order done by the same store.

A summary group ``j`` lies in key block ``j // PER_BLOCK``; the group takes part for query block
``m`` unless the plan keeps that block (``kept[b, h, m, j // PER_BLOCK]``) or the group is empty.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``NB`` blocks, ``NS`` summary
groups, ``G`` tokens per group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import VideoLayout
from ..tail import TailSummaries
from .triton_backend import BLOCK_SIZES
from .triton_common import INTERPRET, LOG2E, check_tiling, head_dim_padded, load_rows, softmax_update

__all__ = ["summarize_triton", "tail_inner", "tail_merge", "tail_summaries"]

BLOCK_T = 16 if INTERPRET else 64  # summary groups per tile of the tail loop
_ROWS = 16  # rows per load of the summary kernel: a group is a whole number of them


# --------------------------------------------------------------------------------------- summaries
@triton.jit
def _summarize(
    K, V, Perm, KS, VS, KVar, KRad, LogN,  #
    stride_kz, stride_kh, stride_kn, stride_kk,  #
    stride_vz, stride_vh, stride_vn, stride_vk,  #
    H, NS,  #
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
):
    j = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM_P)
    k_base = K + b * stride_kz + h * stride_kh
    v_base = V + b * stride_vz + h * stride_vh
    k_sum = tl.zeros([HEAD_DIM_P], dtype=tl.float32)
    v_sum = tl.zeros([HEAD_DIM_P], dtype=tl.float32)
    count = tl.zeros([ROWS], dtype=tl.float32)
    for r0 in tl.static_range(0, GROUP, ROWS):
        tok = tl.load(Perm + j.to(tl.int64) * GROUP + r0 + tl.arange(0, ROWS))  # -1 = padding slot
        real = tok >= 0
        tok = tl.where(real, tok, 0)
        k_sum += tl.sum(load_rows(k_base, tok, real, stride_kn, stride_kk, offs_d, HEAD_DIM).to(tl.float32), 0)
        v_sum += tl.sum(load_rows(v_base, tok, real, stride_vn, stride_vk, offs_d, HEAD_DIM).to(tl.float32), 0)
        count += real.to(tl.float32)
    real_count = tl.sum(count, 0)
    if bh == 0:  # log n of the group (-inf when empty: the end of a short last block), once
        tl.store(LogN + j, tl.where(real_count > 0, tl.log(tl.maximum(real_count, 1.0)), float("-inf")))
    n = tl.maximum(real_count, 1.0)
    k_mean = k_sum / n
    out = bh * NS * HEAD_DIM + j.to(tl.int64) * HEAD_DIM + offs_d
    d_ok = offs_d < HEAD_DIM
    tl.store(KS + out, k_mean.to(KS.dtype.element_ty), mask=d_ok)
    tl.store(VS + out, (v_sum / n).to(VS.dtype.element_ty), mask=d_ok)
    # centred second moments: a second read of the group's rows (L2-resident)
    sq_sum = tl.zeros([HEAD_DIM_P], dtype=tl.float32)
    radius = tl.zeros([ROWS], dtype=tl.float32)
    for r0 in tl.static_range(0, GROUP, ROWS):
        tok = tl.load(Perm + j.to(tl.int64) * GROUP + r0 + tl.arange(0, ROWS))
        real = tok >= 0
        tok = tl.where(real, tok, 0)
        x = load_rows(k_base, tok, real, stride_kn, stride_kk, offs_d, HEAD_DIM).to(tl.float32)
        x = tl.where(real[:, None] & d_ok[None, :], x - k_mean[None, :], 0.0)
        sq = x * x
        sq_sum += tl.sum(sq, 0)
        radius = tl.maximum(radius, tl.sqrt(tl.sum(sq, 1)))
    tl.store(KVar + out, sq_sum / n, mask=d_ok)
    tl.store(KRad + bh * NS + j, tl.max(radius, 0))


def summarize_triton(k: torch.Tensor, v: torch.Tensor, layout: VideoLayout, group: int) -> TailSummaries:
    """:class:`~sparsevid.tail.TailSummaries` of ``k``, ``v`` ``(B, H, L, D)`` (any strides) in one launch:
    keys and values in k's dtype, variance, radius and ``log n`` in float32 (contiguous ``(B, H, NS, ...)``)."""
    parts = torch.ops.sparsevid.tail_summaries(k, v, layout.on(k.device).perm, group)
    return TailSummaries(*parts[:2], parts[4], *parts[2:4], layout.block_size // group)


@torch.library.custom_op("sparsevid::tail_summaries", mutates_args=())
def tail_summaries(k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor, group: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys, values, key_var, key_radius, log_count)`` of groups of ``group`` tile-order slots of ``perm``
    (an opaque op: ``torch.compile``-traceable, CUDA-graph capturable)."""
    B, H, L, D = k.shape
    if group < _ROWS or group % _ROWS or perm.numel() % group:
        raise ValueError(f"Expect a tail group of a multiple of {_ROWS} tokens dividing the {perm.numel()} slots for "
                         f"the Triton summary kernel but got {group}")
    check_tiling("the Triton summary kernel", head_dim=D)
    ns = perm.numel() // group
    dev = k.device
    keys = torch.empty(B, H, ns, D, dtype=k.dtype, device=dev)
    values = torch.empty(B, H, ns, D, dtype=v.dtype, device=dev)
    key_var = torch.empty(B, H, ns, D, dtype=torch.float32, device=dev)
    key_radius = torch.empty(B, H, ns, dtype=torch.float32, device=dev)
    log_count = torch.empty(ns, dtype=torch.float32, device=dev)
    _summarize[(ns, B * H)](
        k, v, perm, keys, values, key_var, key_radius, log_count,  #
        *k.stride(), *v.stride(),  #
        H, ns,  #
        GROUP=group, ROWS=_ROWS, HEAD_DIM=D, HEAD_DIM_P=head_dim_padded(D),  #
        num_warps=4,
    )
    return keys, values, key_var, key_radius, log_count


@tail_summaries.register_fake
def _(k, v, perm, group):
    B, H, L, D = k.shape
    ns = perm.numel() // group
    return (k.new_empty(B, H, ns, D), v.new_empty(B, H, ns, D), k.new_empty(B, H, ns, D, dtype=torch.float32),
            k.new_empty(B, H, ns, dtype=torch.float32), k.new_empty(ns, dtype=torch.float32))


# --------------------------------------------------------------------------------------- tail loop
@triton.jit
def tail_inner(
    acc, l_i, m_i, q,  #
    ks_base, vs_base, var_base, rad_base, LogN, kept_ptr, stride_kpn, gate_ptr,  #
    NS, sm_scale, offs_d,  #
    PER_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
):
    """Online softmax over every summary group a query block skips (``ks_base`` etc.: one (batch, head)'s
    contiguous ``(NS, D)`` summaries; ``kept_ptr``: its plan row of ``NB`` keep flags; ``gate_ptr``: its
    decision ``(log w, variance weight)``, :func:`sparsevid.tail.decide_tail`).

    Logit (natural units) ``s q·k̄ + log n + c · min(½ s² (q∘q)·σ², s |q| r) + log w``, converted to base 2
    for the shared softmax step."""
    d_ok = offs_d < HEAD_DIM
    log_w = tl.load(gate_ptr)
    var_w = tl.load(gate_ptr + 1)
    qf = q.to(tl.float32)
    # The variance term's dot runs in float32 (TF32 on the GPU): σ² overflows float16 at an in-group spread
    # above ~256, and q² underflows it below |q| ~ 0.004.
    q_sq = qf * qf
    q_norm = tl.sqrt(tl.sum(q_sq, 1))
    var_scale = 0.5 * sm_scale * sm_scale
    for j0 in range(0, NS, BLOCK_T):
        offs_j = j0 + tl.arange(0, BLOCK_T)
        j_ok = offs_j < NS
        kept = tl.load(kept_ptr + (offs_j // PER_BLOCK) * stride_kpn, mask=j_ok, other=1)
        log_n = tl.load(LogN + offs_j, mask=j_ok, other=float("-inf"))
        live = j_ok & (kept == 0) & (log_n > float("-inf"))
        tile = offs_j[:, None] * HEAD_DIM + offs_d[None, :]
        tile_ok = j_ok[:, None] & d_ok[None, :]
        ks = tl.load(ks_base + tile, mask=tile_ok, other=0.0)
        z = tl.dot(q, tl.trans(ks)) * sm_scale + log_n[None, :]
        var = tl.load(var_base + tile, mask=tile_ok, other=0.0)  # float32
        gauss = tl.dot(q_sq, tl.trans(var)) * var_scale
        bound = q_norm[:, None] * tl.load(rad_base + offs_j, mask=j_ok, other=0.0)[None, :] * sm_scale
        z += var_w * tl.minimum(gauss, bound) + log_w
        z = tl.where(live[None, :], z * LOG2E, float("-inf"))
        p, acc, l_i, m_i = softmax_update(acc, l_i, m_i, z)
        vs = tl.load(vs_base + tile, mask=tile_ok, other=0.0)
        acc = tl.dot(p.to(vs.dtype), vs, acc)
    return acc, l_i, m_i


# --------------------------------------------------------------------------------------- merge kernel
@triton.jit
def _tail_merge(
    Q, O, LSE, Out, Perm, KS, VS, KVar, KRad, LogN, Kept, Gate, sm_scale,  #
    stride_qz, stride_qh, stride_qm, stride_qk,  #
    stride_oz, stride_oh, stride_om, stride_ok,  #
    stride_lz, stride_lh, stride_lm,  #
    stride_rz, stride_rh, stride_rm, stride_rk,  #
    stride_kpz, stride_kph, stride_kpm, stride_kpn,  #
    H, L, NS,  #
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,  #
    PER_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,  #
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    off_z = bh // H
    off_h = bh % H
    offs_m = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM_P)
    slot = start_m.to(tl.int64) * BLOCK_SIZE + offs_m  # q, O and lse are in tile order: row = slot
    real = slot < L
    slot = tl.where(real, slot, 0)
    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, slot, real, stride_qm, stride_qk, offs_d, HEAD_DIM)
    acc = load_rows(O + off_z * stride_oz + off_h * stride_oh, slot, real, stride_om, stride_ok, offs_d,
                    HEAD_DIM).to(tl.float32)
    m_i = tl.load(LSE + off_z * stride_lz + off_h * stride_lh + slot * stride_lm, mask=real, other=0.0) * LOG2E
    l_i = tl.zeros([BLOCK_SIZE], dtype=tl.float32) + 1.0
    summary = bh * NS * HEAD_DIM
    if tl.load(Gate + bh * 2) > float("-inf"):  # a head that drops its tail: the partial as it is
        acc, l_i, m_i = tail_inner(
            acc, l_i, m_i, q,  #
            KS + summary, VS + summary, KVar + summary, KRad + bh * NS, LogN,  #
            Kept + off_z * stride_kpz + off_h * stride_kph + start_m.to(tl.int64) * stride_kpm, stride_kpn,  #
            Gate + bh * 2, NS, sm_scale, offs_d,  #
            PER_BLOCK, BLOCK_T, HEAD_DIM, HEAD_DIM_P,  #
        )
    tok = tl.load(Perm + slot, mask=real, other=0)  # write to the rows' original positions
    out = acc / l_i[:, None]
    mask = real[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_base = Out + off_z * stride_rz + off_h * stride_rh
    tl.store(o_base + tok[:, None] * stride_rm + offs_d[None, :] * stride_rk, out.to(Out.dtype.element_ty), mask=mask)


@torch.library.custom_op("sparsevid::tail_merge", mutates_args=())
def tail_merge(q_tiles: torch.Tensor, out_tiles: torch.Tensor, lse: torch.Tensor, perm: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, key_var: torch.Tensor, key_radius: torch.Tensor,
               log_count: torch.Tensor, kept: torch.Tensor, gate: torch.Tensor, per_block: int, block_size: int,
               scale: float, like: torch.Tensor) -> torch.Tensor:
    """Merge an exact partial with the tail: ``out_tiles`` ``(B, H, L, D)`` and its natural-log ``lse``
    ``(B, H, L)``, both in tile order (computed from ``q_tiles``, in tile order too), plus the summary
    terms of each row's skipped groups (:class:`~sparsevid.tail.TailSummaries`' tensors; ``kept``: bool
    ``(B, H, NB, NB)``, stride-0 views welcome; ``gate``: float32 contiguous ``(B, H, 2)``, each head's decision,
    :func:`sparsevid.tail.decide_tail`). Returns a tensor shaped and strided like ``like``, each
    row at ``perm`` (the original position of each tile-order slot)."""
    B, H, L, D = q_tiles.shape
    check_tiling("the Triton tail merge", block_size, BLOCK_SIZES, D)
    nb = kept.shape[-1]
    out = torch.empty_like(like)
    kept_u8 = kept.view(torch.uint8)
    _tail_merge[(nb, B * H)](
        q_tiles, out_tiles, lse, out, perm, keys, values, key_var, key_radius, log_count, kept_u8, gate,  #
        float(scale),  #
        *q_tiles.stride(), *out_tiles.stride(), *lse.stride(), *out.stride(), *kept_u8.stride(),  #
        H, L, keys.shape[2],  #
        BLOCK_SIZE=block_size, HEAD_DIM=D, HEAD_DIM_P=head_dim_padded(D), PER_BLOCK=per_block, BLOCK_T=BLOCK_T,  #
        num_warps=4 if block_size * D <= 8192 else 8, num_stages=1,  # 3 stages overflow shared memory at D=128
    )
    return out


@tail_merge.register_fake
def _(q_tiles, out_tiles, lse, perm, keys, values, key_var, key_radius, log_count, kept, gate, per_block, block_size,
      scale, like):
    return torch.empty_like(like)
