"""The 8-bit quantization of block-sparse attention in plain PyTorch: the twin of ``triton_quant`` and
the CPU path of ``quant="int8"`` / ``quant="fp8"`` (backends ``reference-int8``, ``reference-fp8``).

The quantization (SageAttention-style, on a ``BlockPlan``'s own blocks), defined here once and
followed exactly by the Triton pre-pass and kernel:

* **K smoothing**: ``k' = k - mean_L(k)`` per (batch, head), in float32. ``q·k' = q·k - q·mean``
  shifts every score of a query row by one constant, so the softmax is unchanged, while the channel
  offsets that real keys share no longer use up the 8-bit range.
* **Q and K per block**: for each tile-order block (the plan's ``block_size`` slots, ``perm``
  gives their tokens; padding slots are 0) ``amax = max(|x|)`` over the block's rows and channels
  (floored at ``1e-30``), ``code = round(x * (QMAX / amax))`` with ``QMAX = 127`` (int8, round half
  away from zero, clamped to ±127) or ``448`` (fp8 e4m3, round to nearest even, clamped to ±448),
  and the float32 scale ``amax / QMAX``. So a query block and a key block are each one 8-bit tile
  with one scale: the kernel's ``Q·Kᵀ`` is an int8 (or e4m3) dot with int32 (fp32) accumulation,
  dequantised by the product of the two scales.
* **P·V**: ``int8``: P (the unnormalised ``exp(s - max)`` in [0, 1]) and V in float16, fp32
  accumulation. ``fp8``: V per channel over the sequence (``amax_L(|v[..., d]|) / 448``, e4m3), P
  as e4m3 of ``448 · P``; the output is multiplied back by the V scale and divided by ``448 · l``,
  where ``l`` is the row sum of the unrounded P.

What is and is not bit-identical to the kernel: the codes and scales of Q, K and V are the same
computation (float32 ops in the same order; the GPU's division may differ by one ulp, which can move
a code by one at a rounding tie). The kernel's P is relative to the *running* row maximum of the
online softmax; the reference's to the final row maximum, so P's rounding differs in the blocks
seen before the maximum: the kernel matches this reference to about 1e-3 relative L2 (int8) and
1e-2 (fp8), measured in ``tests/test_quant.py``.

Error against the exact fp32 oracle (dense masked SDPA with ``plan.to_mask()``), relative L2 of the
output, measured on standard-normal q, k, v with an offset shared by the keys (tests/test_quant.py,
which checks these bounds): int8 <= 0.015, fp8 <= 0.06. Real attention inputs (peaked rows) give
smaller errors for int8; fp8's 3-bit mantissa on P dominates its error.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``D`` head dim, ``NB`` blocks,
``BS`` block_size, ``S = NB * BS`` slots.
"""

from __future__ import annotations

import torch

from ..backends import register_quant_backends
from ..plan import BlockPlan
from .reference import sparse_attention_reference

__all__ = ["QMAX", "quantize_blocks", "quantize_v_fp8", "sparse_attention_quant_reference"]

QMAX = {"int8": 127.0, "fp8": 448.0}
TINY = 1e-30  # the absmax floor of an all-zero block (its codes are 0 whatever the scale)


def _round(x: torch.Tensor, quant: str) -> torch.Tensor:
    """float32 already scaled to the code range -> codes (int8, or float8_e4m3fn)."""
    if quant == "int8":
        r = (x + torch.where(x >= 0, 0.5, -0.5)).clamp(-127.0, 127.0)
        return torch.trunc(r).to(torch.int8)  # round half away from zero
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)  # round to nearest even


def quantize_blocks(x: torch.Tensor, perm: torch.Tensor, block_size: int, quant: str,
                    shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block 8-bit codes of ``x`` in tile order (the Triton pre-pass's twin).

    Args:
        x (Tensor): ``(B, H, L, D)``, original token order.
        perm (Tensor): int64 ``(S,)``, original token of each tile-order slot, -1 = padding.
        block_size (int): slots per block ``BS``.
        quant (str): ``"int8"`` or ``"fp8"``.
        shift (Tensor | None): float32 ``(B, H, D)`` subtracted first (K smoothing: the key mean).

    Returns:
        ``(codes, scales)``: codes ``(B, H, S, D)`` int8 / float8_e4m3fn in tile order (padding
        rows 0), scales float32 ``(B, H, NB)`` (``x ≈ codes * scale`` of the row's block).
    """
    B, H, L, D = x.shape
    S = perm.numel()
    real = (perm >= 0).view(1, 1, S, 1)
    xt = x[:, :, perm.clamp(min=0)].float()
    if shift is not None:
        xt = xt - shift[:, :, None, :]
    xt = torch.where(real, xt, 0.0).view(B, H, S // block_size, block_size, D)
    amax = xt.abs().amax(dim=(-1, -2)).clamp(min=TINY)
    inv = QMAX[quant] / amax
    codes = _round(xt * inv[..., None, None], quant)
    return codes.view(B, H, S, D), amax / QMAX[quant]


def quantize_v_fp8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V per channel for ``fp8`` P·V: ``(codes float8_e4m3fn (B, H, L, D), scales float32 (B, H, D))``."""
    amax = v.abs().amax(dim=2).float().clamp(min=TINY)
    codes = _round(v.float() * (448.0 / amax)[:, :, None, :], "fp8")
    return codes, amax / 448.0


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, perm: torch.Tensor, L: int) -> torch.Tensor:
    """Tile-order codes and per-block scales -> float32 ``(B, H, L, D)`` in the original order."""
    B, H, S, D = codes.shape
    nb = scales.shape[-1]
    tiles = (codes.float().view(B, H, nb, S // nb, D) * scales[..., None, None]).view(B, H, S, D)
    real = perm >= 0
    out = torch.empty(B, H, L, D, dtype=torch.float32, device=codes.device)
    out[:, :, perm[real]] = tiles[:, :, real]
    return out


def _rounded_probs(quant: str):
    """``scores -> P / l`` with P rounded as the kernel rounds it (fp16, or e4m3 of 448 P)."""

    def probs(scores: torch.Tensor) -> torch.Tensor:
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        l = p.sum(dim=-1, keepdim=True)
        if quant == "int8":
            rounded = p.half().float()
        else:
            rounded = (p * 448.0).to(torch.float8_e4m3fn).float() / 448.0
        return rounded / l

    return probs


def quantized_inputs(q, k, v, perm, block_size: int, quant: str):
    """float32 ``(q̂, k̂, v̂)`` in the original order: exactly what the 8-bit kernel multiplies
    (dequantised codes; k̂ is the *smoothed* key, i.e. without its mean)."""
    L = q.shape[2]
    qc, qs = quantize_blocks(q, perm, block_size, quant)
    kc, ks = quantize_blocks(k, perm, block_size, quant, shift=k.mean(dim=2, dtype=torch.float32))
    if quant == "int8":
        v_hat = v.half().float()
    else:
        vc, vs = quantize_v_fp8(v)
        v_hat = vc.float() * vs[:, :, None, :]
    return _dequantize(qc, qs, perm, L), _dequantize(kc, ks, perm, L), v_hat


def sparse_attention_quant_reference(q, k, v, perm, kv_num_blocks, kv_indices, block_size: int, scale: float,
                                     quant: str) -> torch.Tensor:
    """Block-sparse attention with the 8-bit quantization of the module docstring, in float32 math.

    Args: as :func:`sparsevid.kernels.reference.sparse_attention_reference`, plus ``quant``
    (``"int8"`` or ``"fp8"``). Returns ``(B, H, L, D)`` in q's dtype, original token order.
    """
    q_hat, k_hat, v_hat = quantized_inputs(q, k, v, perm, block_size, quant)
    out = sparse_attention_reference(q_hat, k_hat, v_hat, perm, kv_num_blocks, kv_indices, block_size, scale,
                                     probs_fn=_rounded_probs(quant))
    return out.to(q.dtype)


_DEVICES = ("cpu", "cuda", "mps", "xpu")
# auto picks the reference quantization off CUDA only: on a GPU a quantized request that the Triton
# kernel refuses (fp8 below sm89, head dim 96, ...) is refused, never emulated slowly in PyTorch.
_AUTO = ("cpu", "mps", "xpu")


def _quant_reference(q, k, v, plan, scale, quant):
    return sparse_attention_quant_reference(q, k, v, plan.perm, plan.kv_num_blocks, plan.kv_indices, plan.block_size,
                                            scale, quant)


register_quant_backends(
    "reference", _quant_reference, plans=(BlockPlan,), devices=_DEVICES, priority=0, auto_devices=_AUTO,
    int8=dict(description="int8 quantization reference in PyTorch (float32 math): CPU path and twin of triton-int8"),
    fp8=dict(description="fp8 (e4m3) quantization reference in PyTorch (float32 math): CPU path and twin of "
                         "triton-fp8"),
)
