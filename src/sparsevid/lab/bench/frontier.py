"""``python -m sparsevid bench frontier``: output error vs speed of every planner — which method to pick.

Method (speed claims live in benchmarks, never in tests):

* Inputs: ``sparsevid.lab.data.attention_inputs`` on a real clip (structure from real frames; see its
  docstring), or frames saved with ``torch.save`` (``--frames-file``, uint8 or float ``(N, 3, h, w)``)
  where PyAV cannot decode the bundled clips. One process, one set of q, k, v; every planner at every
  density runs on the same tensors.
* Error: relative L2 error ``||out - dense|| / ||dense||`` of ``sparse_attention(q, k, v, plan)``
  against dense SDPA on the same inputs (float32 math on the CPU; cuDNN on CUDA).
* Time (CUDA only): ``sparse_attention(..., backend="triton")`` — the block-sparse kernel for
  ``BlockPlan`` planners, the M x 1 gather kernel for ``finegrained`` — median of ``--reps`` calls
  between CUDA events after 3 warm-up calls (``bench kernel``'s ``_time``), against dense SDPA forced
  to cuDNN in the same run. Planning time is reported separately (``plan ms``, one call after a
  warm-up one) and is in neither. On the CPU, times are '-' (the reference backend is an oracle,
  not a contender) and the plot shows error vs density.
* 8-bit points (``--quant int8 fp8``): every ``BlockPlan`` point again through
  ``sparse_attention(..., quant=...)`` (the Triton 8-bit kernel on CUDA, the quantization reference
  on the CPU), as method ``"<method>+<quant>"``: its error (vs the same dense SDPA) and speed beside
  the exact point of the same plan.
* Equal-error comparison: for each ``finegrained`` point, the ``draft`` speedup (or density, on the
  CPU) that reaches the same error, interpolated log-linearly between ``draft``'s points.

Output: a table on stdout, ``frontier.png`` and ``results.json`` under ``--out``, and with ``--record``
the table appended to ``--benchmarks-md`` (date, device, versions, exact command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from ...planners import planners_taking
from .common import (add_budget_arguments, add_device_argument, add_quant_argument, add_record_arguments,
                     append_benchmarks, check_bench_outputs, command_line, environment, existing_file, fmt, positive_int,
                     rel_error, time_ms)
from .kernel import PRESETS

FRONTIER_PRESETS = {
    # name: (batch, heads, frames, height, width, text_tokens, head_dim); cpu-small: < 2 min on a laptop CPU
    "cpu-small": (1, 2, 6, 30, 52, 0, 64),
    **PRESETS,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = planners_taking("density")  # every planner with a density budget, in registration order


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default=None, choices=list(FRONTIER_PRESETS),
                        help="problem shape (default: wan1.3b-480p on CUDA, cpu-small elsewhere)")
    parser.add_argument("--heads", type=positive_int, default=None, help="override the shape's heads")
    parser.add_argument("--frames", type=positive_int, default=None, help="override the shape's latent frames")
    add_budget_arguments(parser, METHODS, [0.05, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--clip", default="bigbuckbunny", help="bundled clip for the inputs (default: %(default)s)")
    parser.add_argument("--frames-file", type=existing_file, default=None,
                        help="torch.save'd frames (N, 3, h, w), uint8 or float in [0, 1], instead of decoding --clip")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    add_device_argument(parser)
    parser.add_argument("--reps", type=positive_int, default=20, help="timed calls per contender (CUDA), median reported")
    parser.add_argument("--out", default="out/frontier", help="folder for frontier.png and results.json")
    add_record_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    add_quant_argument(parser, "also run each block-sparse point 8-bit (quant='int8' / 'fp8'), as '<method>+<quant>'",
                       nargs="*")


def _inputs(args, layout, batch, heads, head_dim, dtype, device):
    from sparsevid.lab import data

    clip, source = args.clip, f"clip {args.clip!r}"
    if args.frames_file:
        frames = torch.load(args.frames_file)
        clip = frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()
        source = f"frames from {args.frames_file}"
    q, k, v = data.attention_inputs(clip, layout, heads=heads, head_dim=head_dim, batch=batch, seed=args.seed,
                                    dtype=dtype, device=device)
    return q, k, v, f"{source} (sparsevid.lab.data.attention_inputs)"


def run(args) -> int:
    from tqdm.auto import tqdm

    import sparsevid as sv
    from sparsevid.layout import VideoLayout

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    shape = args.shape or ("wan1.3b-480p" if cuda else "cpu-small")
    if not cuda and shape != "cpu-small":
        raise ValueError(f"Expect --shape cpu-small on the CPU (the reference backend takes hours at the GPU "
                         f"shapes' sizes) but got {shape}; run it on a CUDA device")
    check_bench_outputs(args)
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    batch, heads, frames, height, width, text, head_dim = FRONTIER_PRESETS[shape]
    heads, frames = args.heads or heads, args.frames or frames
    layout = VideoLayout(frames=frames, height=height, width=width, text_tokens=text)
    q, k, v, source = _inputs(args, layout, batch, heads, head_dim, dtype, device)
    versions = f"torch {torch.__version__}"
    if cuda:
        import triton

        versions += f", triton {triton.__version__}, CUDA {torch.version.cuda}"
    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"[frontier] {device_name}, {versions}")
    print(f"[frontier] {layout}; B={batch}, heads={heads}, D={head_dim}, {dtype}, inputs: {source}")

    sdpa = torch.nn.functional.scaled_dot_product_attention
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = sdpa(q, k, v)
            t_dense = time_ms(lambda: sdpa(q, k, v), reps=max(10, args.reps), warmup=3)
    else:
        dense = sdpa(q.float(), k.float(), v.float())
        t_dense = float("nan")
    backend = "triton" if cuda else "reference"

    rows = [dict(method="dense", density=1.0, achieved=1.0, err=0.0, plan_ms=float("nan"), ms=t_dense,
                 speedup=1.0 if cuda else float("nan"))]
    jobs = [(m, d) for m in args.methods for d in args.densities]
    for method, density in tqdm(jobs, desc="frontier", unit="plan"):
        options = {"seed": args.seed} if method == "random" else {}
        make = lambda: sv.plan(q, k, layout, method=method, density=density, **options)  # noqa: E731
        plan = make()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        plan = make()
        if cuda:
            torch.cuda.synchronize()
        plan_ms = (time.perf_counter() - start) * 1e3
        attend = lambda: sv.sparse_attention(q, k, v, plan, backend=backend)  # noqa: E731
        err = rel_error(attend(), dense)
        ms = time_ms(attend, reps=max(10, args.reps), warmup=3) if cuda else float("nan")
        rows.append(dict(method=method, density=density, achieved=plan.density, err=err, plan_ms=plan_ms, ms=ms,
                         speedup=t_dense / ms if cuda else float("nan")))
        for quant in args.quant if isinstance(plan, sv.BlockPlan) else []:
            attend = lambda: sv.sparse_attention(q, k, v, plan, quant=quant)  # noqa: E731
            err = rel_error(attend(), dense)
            ms = time_ms(attend, reps=max(10, args.reps), warmup=3) if cuda else float("nan")
            rows.append(dict(method=f"{method}+{quant}", density=density, achieved=plan.density, err=err,
                             plan_ms=plan_ms, ms=ms, speedup=t_dense / ms if cuda else float("nan")))

    table = _table(rows, cuda)
    summary = _equal_error(rows, "finegrained", "draft", cuda)
    command = command_line()
    header = (f"{environment()}; {layout}; B={batch}, heads={heads}, "
              f"D={head_dim}, {dtype}, inputs: {source}; error = relative L2 of the output vs dense SDPA; "
              + (f"times: median of {max(10, args.reps)} CUDA-event timings after warm-up, dense = cuDNN SDPA "
                 f"{t_dense:.3f} ms." if cuda else "CPU: reference backend, no times."))
    print()
    print(header)
    print(table)
    print(summary)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(header=header, command=command, rows=rows, summary=summary), f, indent=1)
    png = _plot(rows, os.path.join(args.out, "frontier.png"), f"{shape} on {device_name}", cuda)
    print(f"[frontier] wrote {png}")
    if args.record:
        append_benchmarks(args.benchmarks_md, f"bench frontier — {shape}", header, table, extra=summary)
    return 0


def _table(rows, cuda: bool) -> str:
    cols = ["method", "density", "achieved", "rel L2 err", "plan ms", "kernel ms", "speedup vs cuDNN"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [r["method"], fmt(r["density"], "g"), fmt(r["achieved"], ".3f"), fmt(r["err"], ".4f"),
                 fmt(r["plan_ms"], ".1f"), fmt(r["ms"], ".3f"),
                 (fmt(r["speedup"], ".2f") + "x") if cuda else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interp(x, xs, ys):
    """Log-linear interpolation of y at x over points sorted by xs; None outside their range."""
    pts = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1 and x0 > 0:
            t = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def _equal_error(rows, a: str, b: str, cuda: bool) -> str:
    """For each point of method ``a``: what method ``b`` needs for the same error (speedup on CUDA, density on CPU)."""
    key, what = ("speedup", "speedup") if cuda else ("achieved", "density")
    ra = [r for r in rows if r["method"] == a]
    rb = [r for r in rows if r["method"] == b]
    if not ra or not rb:
        return ""
    lines = [f"Equal error, {a} vs {b} ({what} each needs for the same rel L2 error; {b} interpolated):", ""]
    for r in sorted(ra, key=lambda r: r["density"]):
        other = _interp(r["err"], [x["err"] for x in rb], [x[key] for x in rb])
        if other is None:
            lines.append(f"- {a} @ {r['density']:g}: err {r['err']:.4f} — outside {b}'s measured range")
        elif cuda:
            lines.append(f"- err {r['err']:.4f}: {a} {r['speedup']:.2f}x vs {b} {other:.2f}x -> "
                         f"{a} {r['speedup'] / other:.2f}x faster")
        else:
            lines.append(f"- err {r['err']:.4f}: {a} density {r['achieved']:.3f} vs {b} {other:.3f} -> "
                         f"{a} computes {r['achieved'] / other:.2f}x the entries")
    return "\n".join(lines)


def _plot(rows, path, title, cuda: bool):
    from ..viz import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xkey = "speedup" if cuda else "achieved"
    for method in [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]:
        pts = sorted((r[xkey], r["err"]) for r in rows if r["method"] == method and r["err"] > 0)
        if pts:
            ax.plot(*zip(*pts), "-o", ms=3, label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("kernel speedup vs cuDNN SDPA (dense)" if cuda else "density (real entries computed / L²)")
    ax.set_ylabel("relative L2 error of the output")
    ax.set_title(f"error vs {'speed' if cuda else 'density'}: {title}", fontsize=9)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)
