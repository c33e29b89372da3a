"""The Llama MLP in Triton, predicated on a device-side row mask: FastCar's skip inside a CUDA graph.

``out = down(silu(gate(x)) * up(x))`` for the rows whose ``skip`` flag is 0; rows with ``skip != 0``
(replayed, or past a device-side row count) are neither computed nor stored, so ``out`` keeps what
it held there (the cached output one frame earlier). The decision is *data*, read by the kernels on
the device: a captured graph needs no conditional node and no host sync for the skip to save work.

Two launches of one kernel, ``_predicated_linear``, after the Triton matmul tutorial:

1. ``GATED=True``: ``h = silu(x @ W_gateᵀ) * (x @ W_upᵀ)``, both projections of one column tile in
   the same program (two float32 accumulators, one pass over ``x``), the SiLU·mul epilogue in float32;
2. ``GATED=False``: ``out = h @ W_downᵀ``.

One program computes a ``BLOCK_M x BLOCK_N`` output tile. It first loads its rows' ``skip`` flags and
returns before touching a weight when every row of the tile is skipped. At batch 1 (a GEMV: one real
row in a 16-row tile) a replayed token reads no MLP weight; for many rows (frame-parallel) the caller
sorts the kept rows first and passes ``skip = row >= n_kept`` with ``n_kept`` on the device, so the
kernels, launched on a fixed row count, cost what the kept rows' tiles cost.

Autotuning times real work: the first call of a shape first runs the kernels once with every row kept
on scratch outputs (timing the configs on tiles that return at once would pick any of them), so call
the MLP once per shape before a graph capture. Twin: :func:`predicated_mlp_reference`.

Shape legend: ``N`` rows, ``C`` hidden size, ``I`` intermediate size.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["GEMV_ROWS", "INTERPRET", "predicated_mlp", "predicated_mlp_reference"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GEMV_ROWS = 16  # up to this many rows one 16-row tile (the smallest dot) holds them all


# --------------------------------------------------------------------------------------- autotune
def _configs():
    if INTERPRET:  # the CPU interpreter: one config of each kind, few programs (each costs milliseconds there)
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2)
                for m in (GEMV_ROWS, 32)]
    decode = [  # a GEMV padded to the 16-row dot: weight bandwidth, so many narrow column tiles and many
        # loads in flight (deep K steps or deep pipelines: a down projection has only C / BLOCK_N programs)
        triton.Config({"BLOCK_M": GEMV_ROWS, "BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=s)
        for n in (16, 32, 64, 128)
        for k, s in ((128, 4), (256, 3), (128, 6))
    ]
    gemm = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64}, num_warps=w, num_stages=s)
        for m in (64, 128)
        for n in (64, 128)
        for w, s in ((4, 4), (8, 3))
    ]
    return decode + gemm


# an H100/H200 block's shared memory; the estimate below counts every stage (compiled: one stage fewer on the
# mma path), so a config it keeps fits, and one it drops would only have failed to compile
_SHARED_BYTES = 227 * 1024


def _prune(configs, named_args, **kwargs):
    """16-row tiles for up to 16 rows (one tile holds them all), wider ones above; tiles no larger than
    the problem (deduplicated: small models tune a few configs); only configs whose pipelined x and
    weight tiles fit in shared memory (the autotuner would compile the others to fail)."""
    N, in_f, out_f = named_args["N"], named_args["IN_F"], named_args["OUT_F"]
    matrices = 2 if kwargs.get("GATED", named_args.get("GATED")) else 1
    size = named_args["X"].element_size()
    out, seen = [], set()
    for c in configs:
        if (c.kwargs["BLOCK_M"] == GEMV_ROWS) != (N <= GEMV_ROWS):
            continue
        m = min(c.kwargs["BLOCK_M"], max(GEMV_ROWS, triton.next_power_of_2(N)))
        n = min(c.kwargs["BLOCK_N"], max(16, triton.next_power_of_2(out_f)))
        k = min(c.kwargs["BLOCK_K"], max(16, triton.next_power_of_2(in_f)))
        stages = min(c.num_stages, triton.cdiv(in_f, k) + 1)  # no deeper than the K loop
        key = (m, n, k, c.num_warps, stages)
        if key in seen or stages * (m * k + matrices * k * n) * size > _SHARED_BYTES:
            continue
        seen.add(key)
        out.append(triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=c.num_warps, num_stages=stages))
    return out or configs[:1]


def _bench(kernel_call, quantiles):
    """Shorter than the autotuner's default (25 + 100 ms per config): these kernels run for microseconds."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# --------------------------------------------------------------------------------------- kernel
@triton.autotune(configs=_configs(), key=["N", "IN_F", "OUT_F", "GATED"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=_bench)
@triton.jit
def _predicated_linear(
    X, W1, W2, Skip, Out,  #
    stride_xm, stride_xk,  #
    stride_w1n, stride_w1k, stride_w2n, stride_w2k,  #
    stride_om, stride_on,  #
    N, IN_F, OUT_F,  #
    GATED: tl.constexpr, PRECISION: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  #
):
    pid_n = tl.program_id(0)  # column tiles vary fastest: programs running together share their x rows
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    run = tl.load(Skip + offs_m, mask=offs_m < N, other=1) == 0
    if tl.max(run.to(tl.int32), 0) == 0:  # every row replayed or past the count: no weight is read
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < OUT_F
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # weights are (out, in) row-major: load the (BLOCK_K, BLOCK_N) tile of Wᵀ
    w1_ptrs = W1 + offs_k[:, None] * stride_w1k + offs_n[None, :] * stride_w1n
    w2_ptrs = W2 + offs_k[:, None] * stride_w2k + offs_n[None, :] * stride_w2n
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, IN_F, BLOCK_K):
        k_mask = offs_k < IN_F - k0
        x = tl.load(x_ptrs, mask=run[:, None] & k_mask[None, :], other=0.0)  # skipped rows read as 0
        w1 = tl.load(w1_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc1 = tl.dot(x, w1, acc1, input_precision=PRECISION)
        if GATED:
            w2 = tl.load(w2_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc2 = tl.dot(x, w2, acc2, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w1_ptrs += BLOCK_K * stride_w1k
        w2_ptrs += BLOCK_K * stride_w2k
    if GATED:
        acc1 = acc1 * tl.sigmoid(acc1) * acc2  # SiLU(gate) * up
    o_ptrs = Out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc1.to(Out.dtype.element_ty), mask=run[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------- launcher
_TUNED: set = set()


def _linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, skip: torch.Tensor, out: torch.Tensor,
            gated: bool) -> None:
    N, in_f = x.shape
    out_f = out.shape[1]

    def launch(skip, out):
        grid = lambda META: (triton.cdiv(out_f, META["BLOCK_N"]), triton.cdiv(N, META["BLOCK_M"]))  # noqa: E731
        _predicated_linear[grid](
            x, w1, w2, skip, out,  #
            *x.stride(), *w1.stride(), *w2.stride(), *out.stride(),  #
            N, in_f, out_f,  #
            GATED=gated, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32: torch's default matmul
        )

    key = (N, in_f, out_f, gated, x.dtype, x.device)
    if key not in _TUNED and not INTERPRET:  # tune on rows that all run, into scratch outputs
        launch(torch.zeros_like(skip), torch.empty_like(out))
        _TUNED.add(key)
    launch(skip, out)


def predicated_mlp(x: torch.Tensor, skip: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The Llama MLP on the rows of ``x`` that are not skipped, written into ``out`` in place.

    Args:
        x: ``(N, C)`` float16/bfloat16/float32, any strides.
        skip: bool or uint8 ``(N,)`` on the device: nonzero = leave the row of ``out`` as it is.
        w_gate, w_up: ``(I, C)`` (``gate_proj.weight``, ``up_proj.weight``); w_down: ``(C, I)``.
        out: ``(N, C)`` in x's dtype, e.g. the cached outputs one frame earlier.

    Returns:
        ``out``: computed rows ``down(silu(gate(x)) * up(x))`` (float32 accumulation and epilogue,
        the hidden activation rounded to x's dtype), skipped rows untouched.
    """
    if x.dim() != 2 or w_gate.dim() != 2:
        raise ValueError(f"Expect x (N, C) and w_gate (I, C) but got x={tuple(x.shape)}, w_gate={tuple(w_gate.shape)}")
    N, C = x.shape
    I = w_gate.shape[0]
    # checked before the launches: the kernel indexes every operand by these sizes (a mismatch reads out of bounds)
    if skip.shape != (N,) or out.shape != (N, C) or w_gate.shape[1] != C or w_up.shape != (I, C) or w_down.shape != (C, I):
        raise ValueError(f"Expect skip ({N},), out ({N}, {C}), w_up ({I}, {C}), w_down ({C}, {I}) for x ({N}, {C}) and "
                         f"w_gate ({I}, {w_gate.shape[1]}) but got skip={tuple(skip.shape)}, out={tuple(out.shape)}, "
                         f"w_up={tuple(w_up.shape)}, w_down={tuple(w_down.shape)}")
    if not x.dtype == out.dtype == w_gate.dtype == w_up.dtype == w_down.dtype:
        raise TypeError(f"Expect x, out and the weights of one dtype but got x={x.dtype}, out={out.dtype}, "
                        f"w_gate={w_gate.dtype}, w_up={w_up.dtype}, w_down={w_down.dtype}")
    skip = skip.view(torch.uint8) if skip.dtype == torch.bool else skip
    h = torch.empty(N, I, device=x.device, dtype=x.dtype)  # rows of skipped rows stay unwritten and unread
    _linear(x, w_gate, w_up, skip, h, gated=True)
    _linear(h, w_down, w_down, skip, out, gated=False)
    return out


def predicated_mlp_reference(x, skip, w_gate, w_up, w_down, out) -> torch.Tensor:
    """The twin in PyTorch (float32 math, the hidden activation rounded to x's dtype like the kernel)."""
    run = skip == 0
    xr = x[run].float()
    h = (torch.nn.functional.silu(xr @ w_gate.float().T) * (xr @ w_up.float().T)).to(x.dtype)
    out[run] = (h.float() @ w_down.float().T).to(out.dtype)
    return out
