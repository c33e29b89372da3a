"""GPU check of the M x 1 gather kernel (issue 7): correctness, then speed on the wan1.3b-480p shape.

Run from the repository root on a CUDA machine::

    PYTHONPATH=src python3 scripts/gpu_finegrained.py            # results under $OUT or ./out/gpu_finegrained

The frames of the clip are read from ``out/fg_clip/bigbuckbunny_21x240x416.pt`` when present (the GPU
image has no PyAV; make it here with ``torch.save((data.load_clip("bigbuckbunny", 21, (240, 416)) * 255)
.round().to(torch.uint8), path)`` and pass ``carry=["out/fg_clip"]``). The full frontier on the GPU::

    PYTHONPATH=src python3 -m sparsevid bench frontier --shape wan1.3b-480p \
        --frames-file out/fg_clip/bigbuckbunny_21x240x416.pt --out $OUT --record --benchmarks-md $OUT/BENCHMARKS.md

1. Correctness: fp16 / bf16, head dims 64 / 128, transposed (B, L, H, D) inputs, text first/last,
   broadcast plans; gather kernel vs the float32 reference twin and vs masked SDPA.
2. Speed on Wan2.1-1.3B 480p (B=1, 12 heads, VideoLayout(21, 30, 52), D=128, bf16, q/k/v built from
   a real clip): a small explicit config sweep of the gather kernel at density 0.3, then for every
   density the kernel time (median of triton.testing.do_bench) of the gather kernel (finegrained
   plan) and of the block-sparse kernel (draft plan), the relative L2 output error of each against
   dense, and dense cuDNN SDPA (flash as a fallback) in the same process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparsevid as sv
from sparsevid.lab import data
from sparsevid.kernels.triton_blocksparse import sparse_attention_triton
from sparsevid.kernels.triton_gather import token_attention_triton

OUT = Path(os.environ.get("OUT") or "out/gpu_finegrained")
OUT.mkdir(parents=True, exist_ok=True)
RESULTS: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}


def log(*a):
    print(*a, flush=True)
    (OUT / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def dense_sdpa(q, k, v):
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
            return backend.name, (lambda b=backend: _sdpa(b, q, k, v)), out
        except RuntimeError as e:  # noqa: PERF203
            log("sdpa backend", backend.name, "failed:", str(e)[:200])
    raise RuntimeError("no fused SDPA backend")


def _sdpa(backend, q, k, v):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def correctness():
    rows = []
    cases = [
        # layout kwargs, B, H, D, dtype, transposed, broadcast
        (dict(frames=3, height=30, width=52), 1, 2, 128, torch.bfloat16, False, False),
        (dict(frames=3, height=30, width=52), 1, 2, 64, torch.float16, True, False),
        (dict(frames=2, height=17, width=23, text_tokens=77, text_first=True), 2, 3, 128, torch.float16, True, True),
        (dict(frames=2, height=17, width=23, text_tokens=77), 2, 2, 64, torch.bfloat16, False, False),
        (dict(frames=2, height=16, width=16, tile=(4, 4), block_size=16, text_tokens=5), 1, 2, 96, torch.float16, False, False),
    ]
    for lk, B, H, D, dtype, transposed, broadcast in cases:
        layout = sv.VideoLayout(**lk)
        L = layout.num_tokens
        g = torch.Generator(device="cuda").manual_seed(0)
        shape = (B, L, H, D) if transposed else (B, H, L, D)
        q, k, v = (torch.randn(shape, device="cuda", generator=g).to(dtype) for _ in range(3))
        if transposed:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        plan = sv.plan(q[:1, :1] if broadcast else q, k[:1, :1] if broadcast else k, layout, method="finegrained", density=0.2)
        # the autotuned path once (its compile cost is per head dim), explicit configs elsewhere
        auto = (None,) if D == 128 and dtype == torch.bfloat16 else ()
        for cfg in ({"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, *auto):
            if cfg is None:
                out = sv.sparse_attention(q, k, v, plan, backend="triton")
            else:
                B_, H_ = q.shape[:2]
                out = token_attention_triton(
                    q, k, v, plan.perm, plan.kv_num_tokens.expand(B_, H_, -1), plan.kv_tokens.expand(B_, H_, -1, -1),
                    plan.block_size, D**-0.5, config=cfg,
                )
            ref = sv.sparse_attention(q.float(), k.float(), v.float(), plan, backend="reference")
            mask = plan.to_mask()
            sdpa = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
            row = dict(layout=str(layout), B=B, H=H, D=D, dtype=str(dtype), transposed=transposed, broadcast=broadcast,
                       config=cfg or "autotune", err_vs_reference=rel(out, ref), err_vs_masked_sdpa=rel(out, sdpa),
                       reference_vs_sdpa=rel(ref, sdpa), density=plan.density)
            rows.append(row)
            RESULTS["correctness"] = rows
            log(row)
    return rows


def speed(densities=(0.05, 0.1, 0.2, 0.3, 0.5)):
    layout = sv.VideoLayout(21, 30, 52)
    # frames decoded where PyAV is installed (the GPU image has none): carry out/fg_clip
    saved = Path("out/fg_clip/bigbuckbunny_21x240x416.pt")
    clip = torch.load(saved).float() / 255 if saved.exists() else "bigbuckbunny"
    q, k, v = data.attention_inputs(clip, layout, heads=12, head_dim=128, dtype=torch.bfloat16, device="cuda")
    name, dense_fn, dense = dense_sdpa(q, k, v)
    t_dense = bench(dense_fn)
    t_flash = bench(lambda: _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v))
    RESULTS["dense"] = dict(backend=name, ms=t_dense, flash_ms=t_flash, layout=str(layout))
    log("dense", RESULTS["dense"])
    scale = 128**-0.5

    # explicit config sweep of the gather kernel at density 0.3
    fg = sv.plan(q, k, layout, method="finegrained", density=0.3)
    sweep = []
    for bn, w, s in [(64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2), (128, 8, 3), (32, 4, 4), (64, 4, 4)]:
        cfg = {"BLOCK_N": bn, "num_warps": w, "num_stages": s}
        try:
            fn = lambda: token_attention_triton(q, k, v, fg.perm, fg.kv_num_tokens, fg.kv_tokens, 128, scale, config=cfg)  # noqa: E731
            fn()
            sweep.append(dict(cfg, ms=bench(fn)))
        except Exception as e:  # noqa: BLE001
            sweep.append(dict(cfg, error=str(e)[:200]))
        RESULTS["sweep_d0.3"] = sweep
        log(sweep[-1])
    best = min((r for r in sweep if "ms" in r), key=lambda r: r["ms"])
    cfg = {key: best[key] for key in ("BLOCK_N", "num_warps", "num_stages")}

    rows = []
    for d in densities:
        for method in ("finegrained", "draft", "xattn", "window"):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                p = sv.plan(q, k, layout, method=method, density=d)
            except Exception as e:  # noqa: BLE001
                log(method, d, "plan failed", e)
                continue
            torch.cuda.synchronize()
            plan_ms = (time.perf_counter() - t0) * 1e3
            B, H = q.shape[:2]
            if isinstance(p, sv.TokenPlan):
                fn = lambda p=p: token_attention_triton(  # noqa: E731
                    q, k, v, p.perm, p.kv_num_tokens.expand(B, H, -1), p.kv_tokens.expand(B, H, -1, -1), 128, scale, config=cfg)
            else:
                fn = lambda p=p: sparse_attention_triton(  # noqa: E731
                    q, k, v, p.perm, p.kv_num_blocks.expand(B, H, -1), p.kv_indices.expand(B, H, -1, -1), 128, scale)
            out = fn()
            row = dict(method=method, density=d, achieved=p.density, rel_l2=rel(out, dense), ms=bench(fn), plan_ms=plan_ms)
            row["speedup_vs_dense"] = t_dense / row["ms"]
            rows.append(row)
            RESULTS["speed"] = rows
            log(row)
    return rows


if __name__ == "__main__":
    log("device", RESULTS)
    what = sys.argv[1:] or ["correctness", "speed"]
    if "correctness" in what:
        correctness()
    if "speed" in what:
        speed()
    log("done")
