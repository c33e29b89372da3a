"""8-bit block-sparse attention forward in Triton: backends ``triton-int8`` and ``triton-fp8``.

SageAttention-style quantization (defined, with its error bounds, in
:mod:`sparsevid.kernels.reference_quant`, this kernel's twin) on the same ``BlockPlan`` and launch
tables as the bf16 kernel (:mod:`sparsevid.kernels.triton_blocksparse`: ``launch_tables``, its
config pruning, the CSR walk in longest-row-first order, the padding bias):

1. **Pre-pass** (``_quant_prepass``, one program per (tile-order block, batch·head)): loads the
   block's Q, K, V rows *through* ``perm`` (padding slots read as 0), subtracts the key mean (K
   smoothing, computed beforehand by one ``mean`` reduction), takes each block's absmax and writes
   8-bit codes of Q and K in tile order with one float32 scale per block; V goes to tile order as
   float16 (``int8``) or, for ``fp8``, as e4m3 codes with a per-channel scale, *transposed*
   (``(D, S)``: 8-bit MMA operands must be K-major, and P·V reduces over keys).
2. **Main kernel** (``_quant_attn_fwd``, one program per query block of one (batch, head)): the bf16
   kernel's loop, but every load is a contiguous tile-order tile (the gather happened once, in the
   pre-pass), ``Q·Kᵀ`` is an int8 dot with int32 accumulation (``fp8``: e4m3 dot, fp32
   accumulation) scaled by ``scale_q · scale_k · sm_scale · log2(e)``, and ``P·V`` is a float16 dot
   (``fp8``: e4m3 of ``448 · P`` against e4m3 V) accumulated in float32. The finished rows are
   stored back to their ORIGINAL positions through ``perm``.

Workspace per call: Q and K codes (``B·H·S·D`` bytes each), V (twice that for float16), and the
scales; nothing persists.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``NB`` blocks,
``BS`` block_size, ``S = NB * BS`` slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference_quant import TINY
from .triton_backend import BLOCK_SIZES, FP8_BLOCK_SIZES, QUANT_HEAD_DIMS, BlockLaunch
from .triton_blocksparse import _configs, _explicit, _prune, launch_tables  # the bf16 kernel's config space
from .triton_common import INTERPRET, LOG2E, check_tiling, init_state, kept_tile, query_rows, softmax_update, store_rows

__all__ = ["quant_block_sparse_attn", "quant_sparse_attention_triton", "quantize_triton"]

# The interpreter's float32 -> e4m3 cast rounds ties away and drops the carry when rounding reaches
# the next power of two (127.9 -> 64) and flushes subnormals; under it the kernels round to the e4m3
# grid by hand first (round to nearest even, as the GPU's cvt.rn.satfinite and torch do), so the cast
# is exact. On the GPU the hardware cast is used.
_EMULATE_FP8 = tl.constexpr(INTERPRET)


@triton.jit
def _to_e4m3(x):
    """float32 -> float8e4nv, round to nearest even, saturating at ±448."""
    x = tl.clamp(x, -448.0, 448.0)
    if _EMULATE_FP8:
        bits = x.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # 3 mantissa bits
        subnormal = (x + 24576.0) - 24576.0  # multiples of 2**-9 below 2**-6 (24576 = 1.5 * 2**14)
        x = tl.where(tl.abs(x) < 0.015625, subnormal, rounded)
    return x.to(tl.float8e4nv)


# --------------------------------------------------------------------------------------- pre-pass
@triton.jit
def _quantize(x, QMAX: tl.constexpr, FP8: tl.constexpr):
    """float32 tile -> (8-bit codes, float32 scale ``amax / QMAX``); reference_quant.quantize_blocks."""
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-30)
    y = x * (QMAX / amax)
    if FP8:
        code = _to_e4m3(y)
    else:
        code = tl.clamp(y + tl.where(y >= 0, 0.5, -0.5), -127.0, 127.0).to(tl.int8)  # half away from zero
    return code, amax / QMAX


@triton.jit
def _quant_prepass(
    Q, K, V, Perm, KMean, VMax,  #
    QC, KC, VC, SQ, SK,  #
    stride_qz, stride_qh, stride_qm, stride_qk,  #
    stride_kz, stride_kh, stride_kn, stride_kk,  #
    stride_vz, stride_vh, stride_vn, stride_vk,  #
    H, S, NB,  #
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,  #
):
    QMAX: tl.constexpr = 448.0 if FP8 else 127.0
    blk = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    bh = off_hz.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = blk.to(tl.int64) * BLOCK_SIZE + offs_m  # tile-order slots of this block
    tok = tl.load(Perm + rows)
    real = tok >= 0
    tok = tl.where(real, tok, 0)
    mask = real[:, None]
    tile = bh * S * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]  # (BH, S, D) contiguous

    x = tl.load(Q + off_z * stride_qz + off_h * stride_qh + tok[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                mask=mask, other=0.0).to(tl.float32)
    code, s = _quantize(x, QMAX, FP8)
    tl.store(QC + tile, code)
    tl.store(SQ + bh * NB + blk, s)

    mean = tl.load(KMean + bh * HEAD_DIM + offs_d)
    x = tl.load(K + off_z * stride_kz + off_h * stride_kh + tok[:, None] * stride_kn + offs_d[None, :] * stride_kk,
                mask=mask, other=0.0).to(tl.float32)
    x = tl.where(mask, x - mean[None, :], 0.0)
    code, s = _quantize(x, QMAX, FP8)
    tl.store(KC + tile, code)
    tl.store(SK + bh * NB + blk, s)

    x = tl.load(V + off_z * stride_vz + off_h * stride_vh + tok[:, None] * stride_vn + offs_d[None, :] * stride_vk,
                mask=mask, other=0.0).to(tl.float32)
    if FP8:  # per channel, transposed (BH, D, S): the K-major operand of the 8-bit P·V
        vmax = tl.load(VMax + bh * HEAD_DIM + offs_d)
        code = _to_e4m3(x * (448.0 / vmax)[None, :])
        tl.store(VC + bh * HEAD_DIM * S + offs_d[None, :] * S + rows[:, None], code)
    else:
        tl.store(VC + tile, x.to(tl.float16))


# --------------------------------------------------------------------------------------- inner loop
@triton.jit
def _quant_attn_inner(
    acc, l_i, m_i, q, sq,  #
    kc_base, vc_base, sk_base, kvi_ptr, real_ptr, stride_kik, S,  #
    lo, hi, offs_n, offs_d,  #
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,  #
    FP8: tl.constexpr, MASK_PADDING: tl.constexpr, NUM_STAGES: tl.constexpr,  #
):
    """Online softmax over the sub-tiles ``lo..hi`` of one CSR row, on 8-bit tile-order tiles."""
    for t in tl.range(lo, hi, num_stages=NUM_STAGES):
        n, slot0, bias = kept_tile(kvi_ptr, real_ptr, t, stride_kik, offs_n, BLOCK_SIZE, BLOCK_N, MASK_PADDING)
        slots = slot0 + offs_n
        k = tl.load(kc_base + slots[:, None] * HEAD_DIM + offs_d[None, :])
        if FP8:
            qk = tl.dot(q, tl.trans(k))
        else:
            qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        s = sq * tl.load(sk_base + n)  # scale_q * scale_k * sm_scale * log2(e)
        p, acc, l_i, m_i = softmax_update(acc, l_i, m_i, qk * s + bias[None, :])
        if FP8:
            vt = tl.load(vc_base + offs_d[:, None] * S + slots[None, :])  # (D, BLOCK_N)
            acc = tl.dot(_to_e4m3(p * 448.0), tl.trans(vt), acc)
        else:
            v = tl.load(vc_base + slots[:, None] * HEAD_DIM + offs_d[None, :])
            acc = tl.dot(p.to(tl.float16), v, acc)
    return acc, l_i, m_i


# --------------------------------------------------------------------------------------- autotune
def keep(conf):
    """Configs worth timing on Hopper: 8 warps (two warpgroups over the 128-row query tile) at 2-4
    stages, and 4 warps at 2-3 stages (8-bit tiles take half the shared memory of bf16 ones, so
    deeper pipelines fit; the autotuner skips a config that does not)."""
    w, s = conf.num_warps, conf.num_stages
    return INTERPRET or w == 8 or (w == 4 and s in (2, 3))


# --------------------------------------------------------------------------------------- kernel
@triton.autotune(
    configs=list(filter(keep, _configs())),
    key=["HEAD_DIM", "BLOCK_SIZE", "FP8"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _quant_attn_fwd(
    QC, KC, VC, SQ, SK, VMax, Out, Perm, BlockReal, KVNum, KVIdx, Order, qk_scale,  #
    stride_oz, stride_oh, stride_om, stride_ok,  #
    stride_nbz, stride_nbh, stride_nbm,  #
    stride_kiz, stride_kih, stride_kim, stride_kik,  #
    H, S, NB,  #
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,  #
    FP8: tl.constexpr, MASK_PADDING: tl.constexpr, NUM_STAGES: tl.constexpr,  #
):
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
    BLOCK_M: tl.constexpr = BLOCK_SIZE
    SPLIT: tl.constexpr = BLOCK_SIZE // BLOCK_N
    off_hz = tl.program_id(1)
    start_m = tl.load(Order + off_hz.to(tl.int64) * NB + tl.program_id(0))  # longest rows first
    off_z = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    bh = off_hz.to(tl.int64)

    kvi_ptr = KVIdx + off_z * stride_kiz + off_h * stride_kih + start_m.to(tl.int64) * stride_kim
    num = tl.load(KVNum + off_z * stride_nbz + off_h * stride_nbh + start_m.to(tl.int64) * stride_nbm)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start_m.to(tl.int64) * BLOCK_SIZE + offs_m
    q = tl.load(QC + bh * S * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :])
    sq = tl.load(SQ + bh * NB + start_m) * qk_scale

    acc, l_i, m_i = init_state(BLOCK_M, HEAD_DIM)
    if FP8:
        vc_base = VC + bh * HEAD_DIM * S
    else:
        vc_base = VC + bh * S * HEAD_DIM
    acc, l_i, m_i = _quant_attn_inner(
        acc, l_i, m_i, q, sq,  #
        KC + bh * S * HEAD_DIM, vc_base, SK + bh * NB, kvi_ptr, BlockReal, stride_kik, S,  #
        0, num * SPLIT, offs_n, offs_d,  #
        BLOCK_SIZE, BLOCK_N, HEAD_DIM, FP8, MASK_PADDING, NUM_STAGES,  #
    )
    if FP8:  # V's per-channel scale and P's 448
        acc = acc * (tl.load(VMax + bh * HEAD_DIM + offs_d) * (1.0 / (448.0 * 448.0)))[None, :]
    q_tok, q_real = query_rows(Perm, start_m, offs_m, BLOCK_SIZE)
    store_rows(Out + off_z * stride_oz + off_h * stride_oh, q_tok, q_real, acc, l_i, stride_om, stride_ok, offs_d,
               HEAD_DIM)


# --------------------------------------------------------------------------------------- launchers
def quantize_triton(q, k, v, perm, block_size: int, quant: str):
    """Run the pre-pass alone: ``(qc, kc, vc, sq, sk, vmax)``.

    ``qc``/``kc``: ``(B·H, S, D)`` codes in tile order; ``vc``: float16 ``(B·H, S, D)`` (int8) or
    e4m3 ``(B·H, D, S)`` (fp8); ``sq``/``sk``: float32 ``(B·H, NB)``; ``vmax``: float32 ``(B·H, D)``
    per-channel |v| max (fp8; the key mean for int8, unused by the kernel).
    """
    B, H, L, D = q.shape
    fp8 = quant == "fp8"
    check_tiling(f"the {quant} Triton kernels", block_size, FP8_BLOCK_SIZES if fp8 else BLOCK_SIZES, D, QUANT_HEAD_DIMS)
    S = perm.numel()
    NB = S // block_size
    dev = q.device
    code = torch.float8_e4m3fn if fp8 else torch.int8
    qc = torch.empty(B * H, S, D, dtype=code, device=dev)
    kc = torch.empty(B * H, S, D, dtype=code, device=dev)
    vc = torch.empty(B * H, D, S, dtype=code, device=dev) if fp8 else torch.empty(B * H, S, D, dtype=torch.float16,
                                                                                    device=dev)
    sq = torch.empty(B * H, NB, dtype=torch.float32, device=dev)
    sk = torch.empty(B * H, NB, dtype=torch.float32, device=dev)
    k_mean = k.mean(dim=2, dtype=torch.float32)  # (B, H, D) contiguous; K smoothing
    vmax = v.abs().amax(dim=2).float().clamp_(min=TINY) if fp8 else k_mean
    _quant_prepass[(NB, B * H)](
        q, k, v, perm, k_mean, vmax, qc, kc, vc, sq, sk,  #
        *q.stride(), *k.stride(), *v.stride(),  #
        H, S, NB,  #
        HEAD_DIM=D, BLOCK_SIZE=block_size, FP8=fp8, num_warps=4 if block_size * D <= 8192 else 8,
    )
    return qc, kc, vc, sq, sk, vmax


def quant_sparse_attention_triton(q, k, v, perm, kv_num_blocks, kv_indices, block_size: int, scale: float,
                                  quant: str, *, out=None, config: dict | None = None, block_real=None,
                                  order=None) -> torch.Tensor:
    """Pre-pass + ``_quant_attn_fwd``. Assumes validated inputs (``sparsevid.sparse_attention`` checks them).

    Args:
        q, k, v (Tensor): ``(B, H, L, D)``, any strides, float16 / bfloat16, ``D`` in {64, 128}.
        perm, kv_num_blocks, kv_indices, block_size, scale: as
            :func:`sparsevid.kernels.triton_blocksparse.sparse_attention_triton`.
        quant (str): ``"int8"`` or ``"fp8"``.
        out (Tensor | None): optional ``(B, H, L, D)`` output (any strides).
        config (dict | None): bypass the autotuner (``{"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}``).
        block_real, order (Tensor | None): the bf16 kernel's :func:`launch_tables` of this plan.

    Returns:
        Tensor ``(B, H, L, D)`` in the ORIGINAL token order, dtype of ``q`` (``torch.empty_like(q)``).
    """
    B, H, L, D = q.shape
    if out is None:
        out = torch.empty_like(q)
    if block_real is None or order is None:
        block_real, order = launch_tables(perm, kv_num_blocks, block_size, B, H)
    qc, kc, vc, sq, sk, vmax = quantize_triton(q, k, v, perm, block_size, quant)
    S = perm.numel()
    NB = S // block_size
    args = (
        qc, kc, vc, sq, sk, vmax, out, perm, block_real, kv_num_blocks, kv_indices, order,
        float(scale) * LOG2E.value,  # base-2 scores: exp2 in the kernel
        *out.stride(), *kv_num_blocks.stride(), *kv_indices.stride(),  #
        H, S, NB,
    )
    meta = dict(HEAD_DIM=D, BLOCK_SIZE=block_size, FP8=quant == "fp8", MASK_PADDING=S != L)
    grid = (NB, B * H)
    if config is None:
        _quant_attn_fwd[grid](*args, **meta)
    else:
        _quant_attn_fwd.fn[grid](*args, **meta, **_explicit(config, block_size))
    return out


@torch.library.custom_op("sparsevid::quant_block_sparse_attn", mutates_args=())
def quant_block_sparse_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float,
    quant: str,
    block_real: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.ops.sparsevid.quant_block_sparse_attn``: :func:`quant_sparse_attention_triton` as an
    opaque op (``torch.compile``-traceable through its fake kernel; no host syncs)."""
    return quant_sparse_attention_triton(q, k, v, perm, kv_num_blocks, kv_indices, block_size, scale, quant,
                                         block_real=block_real, order=order)


@quant_block_sparse_attn.register_fake
def _(q, k, v, perm, kv_num_blocks, kv_indices, block_size, scale, quant, block_real=None, order=None):
    return torch.empty_like(q)


# --------------------------------------------------------------------------------------- backend entry
def quant_attention(q, k, v, plan, scale, quant):
    """The ``triton-int8`` / ``triton-fp8`` backends (registered in :mod:`.triton_backend`): the bf16 kernel's
    launch struct, one per plan whichever kernel runs."""
    launch = plan.launch(BlockLaunch, *q.shape[:2])
    return quant_block_sparse_attn(q, k, v, launch.perm, launch.kv_num_blocks, launch.kv_indices, launch.block_size,
                                   scale, quant, launch.block_real, launch.order)
