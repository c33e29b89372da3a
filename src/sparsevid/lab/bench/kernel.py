"""``python -m sparsevid bench kernel``: the block-sparse kernel against dense SDPA and FlexAttention.

Method (written here because speed claims live in benchmarks, never in tests):

* One process, one set of inputs (q, k, v bf16 by default, ``(B, heads, L, D)`` contiguous), every
  contender timed in the same run on the same tensors.
* Each timing: 3 warm-up calls, then ``--reps`` (>= 10) calls each between two CUDA events; the
  median is reported. Compilation (Triton JIT/autotune, ``torch.compile`` of FlexAttention) happens in
  the warm-up.
* Contenders: torch SDPA forced to the cuDNN backend and to the flash backend (dense, the baseline);
  FlashAttention-4 dense (``fa4-dense``, when ``flash-attn-4`` is installed); FlexAttention
  (``torch.compile(flex_attention)``) with the SAME plan as a ``BlockMask`` over tensors gathered
  into tile order (key blocks without padding listed as *full* blocks, blocks with padding as
  *partial* with a ``mask_mod`` hiding padding slots; the gather of q, k, v into tile order and the
  scatter back are EXCLUDED from its attention time and reported once, separately, as ``flex
  gather``); and ``sparsevid.sparse_attention(q, k, v, plan, backend=...)`` timed as a user calls it,
  everything the call does included: ``sparsevid-triton`` (permutation fused into the kernel),
  ``sparsevid-fa4`` (FlashAttention-4 block-sparse, with its gather into tile order and the scatter
  back) and ``sparsevid-fa4-tiled`` (the same on inputs already in tile order, as ``sparsevid.apply``
  keeps a model's tokens: no gather). Planning time (``sparsevid.plan``) is reported separately
  (``plan ms``: CUDA events around one call; ``plan graph ms``: the same planning replayed as a
  CUDA graph, i.e. its GPU time without launch gaps, which is what it costs inside a forward that
  runs ahead of the GPU) and is in no attention time. ``graph ms`` is each sparsevid call replayed
  as a CUDA graph: its GPU time alone (the gap to ``ms`` is host work per call, which a forward that
  runs ahead of the GPU hides). ``fa4 first call`` is FlashAttention-4's
  compile time for the shape (its kernel cache is per process unless
  ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``).
* 8-bit contenders (``sparsevid-triton-int8``, ``sparsevid-triton-fp8``: ``quant="int8"`` / ``"fp8"``,
  timed as a user calls them, the quantization pre-pass and its gather included) run on the same
  plan; ``vs bf16 L2`` is every row's relative L2 error against the bf16 sparse output of the same
  plan (``sparsevid-triton``, else ``sparsevid-fa4``, else the reference backend): the 8-bit
  accuracy target reads there (issue 15: <= 0.03 on clip inputs). A quantized row is WRONG only
  above ``--quant-tol`` (a broken kernel, not a missed target). ``vs fa4`` / ``vs fa4-tiled``: the
  ``sparsevid-fa4`` / ``sparsevid-fa4-tiled`` time of the same plan divided by the row's.
* ``--tail METHOD``: every exact sparsevid row again with ``tail=METHOD`` (kernel ``name+METHOD``),
  checked against the reference backend with the same summaries; ``tail +%`` is its time over the
  same kernel's without the tail, minus 1 (summary pass, tail terms and, for ``fa4``, the merge).
* ``vs Flex+gather`` charges FlexAttention its gather/scatter too (what a caller holding q, k, v in
  the original order pays per call); ``vs Flex`` does not.
* FLOPs: dense-equivalent ``4 * B * H * L^2 * D``; "actual" multiplies by the plan's real-entry
  density (``plan.density``: real score entries computed / ``L^2``; padding slots computed by the
  kernels are not counted, so they count against the kernels).
* Correctness: every sparse result is compared with FlexAttention's on the same plan (and, at
  density 1, with cuDNN SDPA); a relative error ``||a - b|| / ||b||`` above ``--tol`` marks the row
  WRONG and its speed is not reported.

Output: a table on stdout, ``speedup.png`` and ``results.json`` under ``--out``, and with ``--record``
the table appended to ``--benchmarks-md`` (date, device, versions, exact command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from .common import (add_budget_arguments, add_record_arguments, add_tail_argument, append_benchmarks,
                     check_bench_outputs, command_line, environment, fmt, non_negative_int, positive_int, rel_error,
                     time_ms)

PRESETS = {
    # name: (batch, heads, frames, height, width, text_tokens, head_dim)
    "wan1.3b-480p": (1, 12, 21, 30, 52, 0, 128),
    "wan14b-720p": (1, 40, 21, 45, 80, 0, 128),
    "hunyuan-720p": (1, 24, 33, 45, 80, 256, 128),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="wan1.3b-480p", choices=[*PRESETS, "custom"],
                        help="problem shape (default wan1.3b-480p); 'custom' uses --frames/--height/...")
    parser.add_argument("--frames", type=positive_int, default=None)
    parser.add_argument("--height", type=positive_int, default=None, help="token rows per frame")
    parser.add_argument("--width", type=positive_int, default=None, help="token columns per frame")
    parser.add_argument("--heads", type=positive_int, default=None)
    parser.add_argument("--head-dim", type=positive_int, default=None)
    parser.add_argument("--text-tokens", type=non_negative_int, default=None)
    parser.add_argument("--batch", type=positive_int, default=None)
    parser.add_argument("--block-size", type=positive_int, default=128)
    add_budget_arguments(parser, ["random", "draft"], [1.0, 0.5, 0.25, 0.1, 0.05], methods_help="planners to take plans from")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--inputs", choices=["clip", "random"], default="clip",
                        help="'clip': sparsevid.lab.data.attention_inputs (structure from a real clip), falling "
                             "back to random when unavailable; 'random': standard normal")
    parser.add_argument("--reps", type=positive_int, default=20, help="timed calls per contender (>= 10), median reported")
    parser.add_argument("--tol", type=float, default=2e-2, help="max relative error vs FlexAttention / SDPA")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--backends", nargs="+", default=["triton", "fa4", "triton-int8", "triton-fp8"],
                        help="sparsevid backends to time (those not usable here are skipped, and said); "
                             "triton-int8 / triton-fp8 are the 8-bit kernels (quant='int8' / 'fp8')")
    add_tail_argument(parser, "every exact sparsevid row once per value, the tailed rows checked against the "
                              "reference with the same summaries")
    parser.add_argument("--quant-tol", type=float, default=0.1,
                        help="max relative error of an 8-bit row vs the reference before it is marked WRONG")
    parser.add_argument("--out", default="out/bench", help="folder for speedup.png and results.json")
    add_record_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------------------- timing
# ----------------------------------------------------------------------------------------- problem
def _problem(args):
    from sparsevid.layout import VideoLayout

    if args.shape == "custom":
        missing = [n for n in ("frames", "height", "width", "heads") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"Expect {', '.join('--' + m for m in missing)} with --shape custom but got none")
        batch, heads, frames, height, width, text, head_dim = 1, args.heads, args.frames, args.height, args.width, 0, 128
    else:
        batch, heads, frames, height, width, text, head_dim = PRESETS[args.shape]
    batch = args.batch or batch
    heads = args.heads or heads
    frames, height, width = args.frames or frames, args.height or height, args.width or width
    text = args.text_tokens if args.text_tokens is not None else text
    head_dim = args.head_dim or head_dim
    layout = VideoLayout(frames=frames, height=height, width=width, text_tokens=text, block_size=args.block_size)
    return batch, heads, head_dim, layout


def _inputs(args, batch, heads, head_dim, layout, dtype):
    if args.inputs == "clip":
        try:
            from sparsevid.lab import data

            q, k, v = data.attention_inputs(layout=layout, heads=heads, head_dim=head_dim, batch=batch,
                                            seed=args.seed, dtype=dtype, device="cuda")
            return q.contiguous(), k.contiguous(), v.contiguous(), "clip (sparsevid.lab.data.attention_inputs)"
        except Exception as exc:  # noqa: BLE001 - any failure falls back to random, and says so
            print(f"[bench] clip inputs unavailable ({type(exc).__name__}: {exc}); using random inputs", file=sys.stderr)
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    shape = (batch, heads, layout.num_tokens, head_dim)
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(dtype) for _ in range(3))
    return q, k, v, "random normal"


def _make_plan(method, density, q, k, layout):
    """``(plan, plan ms, plan graph ms)``; None when the planner fails."""
    import sparsevid

    try:
        fn = lambda: sparsevid.plan(q, k, layout, method=method, density=density, validate=False)  # noqa: E731
        plan = fn()
        return plan, time_ms(fn, reps=10, warmup=3), _graph_ms(fn)
    except Exception as exc:  # noqa: BLE001
        print(f"[bench] sparsevid.plan(method={method!r}) failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _graph_ms(fn) -> float:
    """Median ms of ``fn`` replayed as a captured CUDA graph (GPU time without launch gaps); NaN (and
    a message) if it cannot be captured."""
    try:
        fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay, reps=20, warmup=3)
    except Exception as exc:  # noqa: BLE001 - reported, never silent
        print(f"[bench] could not capture a CUDA graph: {type(exc).__name__}: {exc}", file=sys.stderr)
        return float("nan")


def _first_call_s(fn) -> float:
    """Wall seconds of a first call (compilation included)."""
    import time

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _block_mask(layout, num, idx):
    """FlexAttention BlockMask of the plan over tile-order tensors: full blocks unmasked, padded blocks partial."""
    from torch.nn.attention.flex_attention import BlockMask

    nb, bs, dev = layout.num_blocks, layout.block_size, num.device
    valid = torch.arange(idx.shape[-1], device=dev) < num[..., None]
    dense = torch.zeros(*num.shape, nb, dtype=torch.int32, device=dev)
    dense = dense.scatter_add_(-1, idx.long().clamp(0, nb - 1), valid.int()) > 0
    full_key = layout.block_tokens.to(dev) == bs
    real = layout.perm.to(dev) >= 0

    def csr(d):  # width NB always: one compiled FlexAttention serves every density
        cnt = d.sum(-1, dtype=torch.int32)
        order = torch.where(d, torch.arange(nb, device=dev), nb).sort(-1).values.clamp(max=nb - 1)
        return cnt, order.int()

    def padding_mask(b, h, q_idx, kv_idx):
        return real[kv_idx]

    return BlockMask.from_kv_blocks(*csr(dense & ~full_key), *csr(dense & full_key), BLOCK_SIZE=bs,
                                    mask_mod=padding_mask, seq_lengths=(layout.num_slots, layout.num_slots))


# ----------------------------------------------------------------------------------------- run
def run(args) -> int:
    from ...planners import planner_spec

    for method in args.methods:  # a planner that fails on a density is skipped in the sweep, an unknown one refused
        planner_spec(method)
    if not torch.cuda.is_available():
        raise ValueError("Expect a CUDA device for bench kernel (it times GPU kernels) but this process has none")
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import sparsevid

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(it, **kw):
            return it

    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = DTYPES[args.dtype]
    batch, heads, head_dim, layout = _problem(args)
    check_bench_outputs(args)
    L = layout.num_tokens
    q, k, v, source = _inputs(args, batch, heads, head_dim, layout, dtype)
    scale = head_dim ** -0.5
    flops = 4.0 * batch * heads * L * L * head_dim
    reps = max(10, args.reps)
    device_name = torch.cuda.get_device_name()
    usable = set(sparsevid.available_backends("cuda"))
    tails = args.tail
    from sparsevid.backends import tail_backends

    tail_backends = set(tail_backends())
    backends = [b for b in args.backends if b in usable]
    for b in sorted(set(args.backends) - usable):
        reason = {d["name"]: d["reason"] for d in sparsevid.describe_backends("cuda")}.get(b, "not registered")
        print(f"[bench] backend {b!r} skipped: {reason}", file=sys.stderr)
    print(f"[bench] {device_name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"[bench] {layout}; B={batch}, heads={heads}, D={head_dim}, {args.dtype}, inputs: {source}")

    rows = []
    dense = {}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref_dense = sdpa(q, k, v, scale=scale)
        dense["sdpa-cudnn"] = (time_ms(lambda: sdpa(q, k, v, scale=scale), reps=reps, warmup=3), 0.0)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            err = rel_error(sdpa(q, k, v, scale=scale), ref_dense)
            dense["sdpa-flash"] = (time_ms(lambda: sdpa(q, k, v, scale=scale), reps=reps, warmup=3), err)
    except RuntimeError as exc:
        print(f"[bench] flash SDPA unavailable: {exc}", file=sys.stderr)
    first_call = {}
    if "fa4" in backends:
        from sparsevid.kernels.fa4 import _fa4_dense

        first_call["fa4-dense"] = _first_call_s(lambda: _fa4_dense(q, k, v, scale))
        err = rel_error(_fa4_dense(q, k, v, scale), ref_dense)
        dense["fa4-dense"] = (time_ms(lambda: _fa4_dense(q, k, v, scale), reps=reps, warmup=3), err)
    t_cudnn = dense["sdpa-cudnn"][0]
    for name, (ms, err) in dense.items():
        rows.append(dict(method="dense", density=1.0, real_density=1.0, kernel=name, ms=ms, plan_ms=float("nan"),
                         plan_graph_ms=float("nan"), err=err, ok=err <= args.tol))

    flex, gather_ms, scatter_ms = None, float("nan"), float("nan")
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        qt, kt, vt = (layout.to_tiles(t) for t in (q, k, v))
        gather_ms = time_ms(lambda: [layout.to_tiles(t) for t in (q, k, v)], reps=reps, warmup=3)
        scatter_ms = time_ms(lambda: layout.from_tiles(qt), reps=reps, warmup=3)
        print(f"[bench] flex gather (q,k,v -> tile order) {gather_ms:.3f} ms + scatter back {scatter_ms:.3f} ms: "
              "excluded from FlexAttention's times below")
    tiled = layout.replace(tiled=True)
    q_tiled, k_tiled, v_tiled = (t.transpose(1, 2).index_select(1, layout.perm[:L].cuda()).transpose(1, 2)
                                 for t in (q, k, v))  # (B, L, H, D) memory in tile order, as apply keeps it

    sweep = [(m, d) for m in args.methods for d in args.densities]
    for method, density in tqdm(sweep, desc="bench kernel", unit="plan"):
        made = _make_plan(method, density, q, k, layout)
        if made is None:
            print(f"[bench] no plan for method {method!r}: skipped", file=sys.stderr)
            continue
        plan, plan_ms, plan_graph_ms = made
        real_density = float(plan.density)
        common = dict(method=method, density=density, real_density=real_density, plan_ms=plan_ms,
                      plan_graph_ms=plan_graph_ms)
        ref, ref_name = (ref_dense, "cudnn") if density >= 1.0 else (None, None)
        if flex is not None:
            bm = _block_mask(layout, plan.kv_num_blocks, plan.kv_indices)
            out_flex = layout.from_tiles(flex(qt, kt, vt, block_mask=bm, scale=scale))
            t = time_ms(lambda: flex(qt, kt, vt, block_mask=bm, scale=scale), reps=reps, warmup=3)
            err_flex = rel_error(out_flex, ref_dense) if density >= 1.0 else 0.0
            rows.append(dict(common, kernel="flex", ms=t, err=err_flex, ok=err_flex <= args.tol))
            if ref is None:
                ref, ref_name = out_flex, "flex"
        if ref is None:
            ref, ref_name = sparsevid.sparse_attention(q, k, v, plan, backend="reference"), "reference"
        quantized = {d["name"]: d["quant"] for d in sparsevid.describe_backends("cuda")}
        exact = [b for b in backends if quantized.get(b) is None]
        contenders = [(f"sparsevid-{b}", b, (q, k, v), plan) for b in exact]
        if "fa4" in backends:
            # validated here, once: no one-time validation inside the timing
            plan_tiled = sparsevid.BlockPlan(tiled, plan.kv_num_blocks, plan.kv_indices, method).validate()
            contenders.append(("sparsevid-fa4-tiled", "fa4", (q_tiled, k_tiled, v_tiled), plan_tiled))
        tailed = [(f"{name}+{tail}", backend, inputs, p, tail) for tail in tails if tail is not None
                  for name, backend, inputs, p in contenders if backend in tail_backends]
        contenders = [(*c, None) for c in contenders] if None in tails else []
        contenders += tailed
        contenders += [(f"sparsevid-{b}", b, (q, k, v), plan, None) for b in backends if quantized.get(b) is not None]
        bf16_out = None
        tail_refs = {}
        for name, backend, (a, b_, c), p, tail in contenders:
            call = lambda: sparsevid.sparse_attention(a, b_, c, p, scale=scale, backend=backend, tail=tail)  # noqa: E731
            if name not in first_call and backend == "fa4":
                first_call[name] = _first_call_s(call)
            out = call()
            if p.layout.tiled:
                out = layout.from_tiles(out)
            if tail is not None and tail not in tail_refs:  # the twin with the same summaries
                tail_refs[tail] = sparsevid.sparse_attention(q, k, v, plan, scale=scale, backend="reference", tail=tail)
            err = rel_error(out, ref if tail is None else tail_refs[tail])
            quant = quantized.get(backend)
            ok = bool(torch.isfinite(out).all()) and err <= (args.tol if quant is None else args.quant_tol)
            if bf16_out is None and quant is None:
                bf16_out = out
            # against the plain bf16 output: the 8-bit rows' accuracy; a tail row differs from it by design
            err_bf16 = None if tail else rel_error(out, bf16_out if bf16_out is not None else ref)
            t = time_ms(call, reps=reps, warmup=3)
            rows.append(dict(common, kernel=name, ms=t, err=err, ok=ok, graph_ms=_graph_ms(call), quant=quant,
                             err_bf16=err_bf16, tail=tail))
            print(f"[bench] {method} d={density}: {name} {t:.3f} ms, rel err {err:.2e} vs {ref_name}, "
                  f"{fmt(err_bf16, '.2e')} vs bf16 sparse{'' if ok else '  WRONG'}")
        print(f"[bench] {method} d={density}: real density {real_density:.4f}, plan {plan_ms:.3f} ms "
              f"(graph {plan_graph_ms:.3f} ms)")

    flex_ms = {(r["method"], r["density"]): r["ms"] for r in rows if r["kernel"] == "flex" and r["ok"]}
    triton_ms = {(r["method"], r["density"]): r["ms"] for r in rows if r["kernel"] == "sparsevid-triton" and r["ok"]}
    fa4_ms = {(r["method"], r["density"]): r["ms"] for r in rows if r["kernel"] == "sparsevid-fa4" and r["ok"]}
    fa4_tiled_ms = {(r["method"], r["density"]): r["ms"] for r in rows
                    if r["kernel"] == "sparsevid-fa4-tiled" and r["ok"]}
    untailed = {(r["method"], r["density"], r["kernel"]): r["ms"] for r in rows if r["ok"] and not r.get("tail")}
    for r in rows:
        base = untailed.get((r["method"], r["density"], r["kernel"].split("+")[0])) if r.get("tail") else None
        r["tail_cost"] = r["ms"] / base - 1 if base and r["ok"] else float("nan")
        r["tflops_dense_eq"] = flops / r["ms"] / 1e9
        r["tflops_actual"] = r["tflops_dense_eq"] * r["real_density"]
        r["vs_cudnn"] = t_cudnn / r["ms"]
        f = flex_ms.get((r["method"], r["density"]))
        r["vs_flex"] = f / r["ms"] if f else float("nan")
        r["vs_flex_gather"] = (f + gather_ms + scatter_ms) / r["ms"] if f and flex is not None else float("nan")
        t = triton_ms.get((r["method"], r["density"]))
        r["vs_triton"] = t / r["ms"] if t else float("nan")
        t = fa4_ms.get((r["method"], r["density"]))
        r["vs_fa4"] = t / r["ms"] if t else float("nan")
        t = fa4_tiled_ms.get((r["method"], r["density"]))
        r["vs_fa4_tiled"] = t / r["ms"] if t else float("nan")

    command = command_line()
    header = (f"{environment()}; {layout}; B={batch}, heads={heads}, D={head_dim}, "
              f"{args.dtype}, inputs: {source}; median of {reps} (CUDA events, after warm-up). "
              f"Flex times exclude the tile-order gather{f' ({gather_ms:.2f} ms + {scatter_ms:.2f} ms back)' if flex else ''}."
              + "".join(f" First call of {n}: {sec:.1f} s." for n, sec in first_call.items()))
    table = _table(rows)
    print()
    print(header)
    print(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(header=header, command=command, rows=rows, first_call_s=first_call), f, indent=1)
    _plot(rows, os.path.join(args.out, "speedup.png"), f"{args.shape} on {device_name}")
    if args.record:
        append_benchmarks(args.benchmarks_md, f"bench kernel — {args.shape}", header, table)
    return 0 if all(r["ok"] for r in rows) else 1


def _table(rows) -> str:
    cols = ["method", "density", "real dens.", "kernel", "ms", "graph ms", "TF/s dense-eq", "TF/s actual", "vs cuDNN",
            "vs Flex", "vs Flex+gather", "vs triton", "vs fa4", "vs fa4-tiled", "tail +%", "rel err", "vs bf16 L2",
            "plan ms", "plan graph ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        wrong = not r["ok"]
        cells = [r["method"], fmt(r["density"], "g"), fmt(r["real_density"], ".3f"), r["kernel"],
                 "WRONG" if wrong else fmt(r["ms"], ".3f"), fmt(r.get("graph_ms"), ".3f"),
                 "-" if wrong else fmt(r["tflops_dense_eq"], ".0f"),
                 "-" if wrong else fmt(r["tflops_actual"], ".0f"),
                 "-" if wrong else fmt(r["vs_cudnn"], ".2f") + "x",
                 "-" if wrong or math.isnan(r["vs_flex"]) else fmt(r["vs_flex"], ".2f") + "x",
                 "-" if wrong or math.isnan(r["vs_flex_gather"]) else fmt(r["vs_flex_gather"], ".2f") + "x",
                 "-" if wrong or math.isnan(r["vs_triton"]) else fmt(r["vs_triton"], ".2f") + "x",
                 "-" if wrong or math.isnan(r["vs_fa4"]) else fmt(r["vs_fa4"], ".2f") + "x",
                 "-" if wrong or math.isnan(r["vs_fa4_tiled"]) else fmt(r["vs_fa4_tiled"], ".2f") + "x",
                 "-" if math.isnan(r.get("tail_cost", float("nan"))) else f"{100 * r['tail_cost']:+.1f}",
                 fmt(r["err"], ".1e"), fmt(r.get("err_bf16"), ".1e"), fmt(r["plan_ms"], ".3f"),
                 fmt(r["plan_graph_ms"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows, path, title):
    from ..viz import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = {"sparsevid-triton": "o", "sparsevid-fa4": "^", "sparsevid-fa4-tiled": "v", "sparsevid-triton-int8": "D",
               "sparsevid-triton-fp8": "P", "flex": "s"}
    kernels = list(dict.fromkeys(r["kernel"] for r in rows if r["method"] != "dense"))
    for method in sorted({r["method"] for r in rows if r["method"] != "dense"}):
        for kernel in kernels:
            base, _, tail = kernel.partition("+")  # a tail row: its kernel's marker, dotted
            style = (":" if tail else "--" if base == "flex" else "-") + markers.get(base, "o")
            pts = sorted((r["real_density"], r["vs_cudnn"]) for r in rows
                         if r["method"] == method and r["kernel"] == kernel and r["ok"])
            if pts:
                ax.plot(*zip(*pts), style, label=f"{kernel} ({method} plan)")
    xs = [0.03, 1.0]
    ax.plot(xs, [1 / x for x in xs], ":", color="gray", label="ideal 1/density")
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("real-entry density")
    ax.set_ylabel("speedup vs cuDNN SDPA (dense)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)
    print(f"[bench] wrote {path}")
