"""What the clustered layout looks like on testbed-l's own attention (real cluster sizes, not synthetic ones): per
layer, the plan's density (the own-cluster rule included), how full the kernel's query tiles are, how fragmented
the kept keys are (merged ranges per query cluster), the tail decision, and the attention error against dense with
and without the cluster tail. Runs on the CPU (a few minutes: testbed-l at full size) or a GPU.

The quantities that set the clustered kernel's cost apart from its arithmetic (docs/kernel-notes.md): a query
tile pays for its kept keys whether its rows are filled or not, and each kept range ends in a partial chunk.

    PYTHONPATH=src python scripts/cluster_layout_stats.py --steps 10 --density 0.1
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import sparsevid as sv
from sparsevid.lab.bench.common import environment, markdown_table
from sparsevid.lab.eval import LayerCapture, default_capture_step
from sparsevid.lab.testbed import LABELS
from sparsevid.lab.testbed.motion import held_out_cases
from sparsevid.lab.testbed.pipeline import load_pipeline
from sparsevid.tail import CLUSTER_TAIL, decide_cluster_tail


def layer_row(index: int, q, k, v, scale: float, layout, density: float) -> dict:
    plan = sv.plan(q, k, layout, method="clustered", density=density, validate=False)
    sizes = plan.q_offsets.diff(dim=-1).float()
    fill = {bm: float(sizes.sum() / ((sizes / bm).ceil() * bm).sum()) for bm in (32, 64, 128)}
    kept = plan.kept_clusters()  # (B, H, Cq, Ck): a range opens at every kept cluster whose predecessor is dropped
    opens = kept & ~torch.nn.functional.pad(kept[..., :-1], (1, 0), value=False)
    nonempty = plan.k_sizes > 0
    ranges = (opens & nonempty.unsqueeze(-2)).sum(-1).float()  # empty clusters between two kept ones ignored
    kept_tokens = plan.kept_tokens().float()
    dense = F.scaled_dot_product_attention(q, k, v, scale=scale).float()

    def error(out):
        return float((out.float() - dense).norm() / dense.norm())

    gate = decide_cluster_tail(q, k, v, plan, scale)
    return dict(
        layer=index, density=plan.density, fill32=fill[32], fill64=fill[64], fill128=fill[128],
        largest_cluster=int(sizes.max()), ranges=float(ranges.mean()),
        range_tokens=float((kept_tokens / ranges.clamp(min=1)).mean()),
        tail_heads=float((gate > float("-inf")).float().mean()),
        err_no_tail=error(sv.sparse_attention(q, k, v, plan, scale=scale, tail=None, backend="reference")),
        err_tail=error(sv.sparse_attention(q, k, v, plan, scale=scale, tail=CLUSTER_TAIL, backend="reference")),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="sampler steps; q/k/v captured at the first sparse one")
    p.add_argument("--case", type=int, default=0, help="held-out case (eval --held-out's order)")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--out", default="out/cluster_layout_stats.json")
    args = p.parse_args(argv)
    pipe = load_pipeline(name="large")
    case = held_out_cases(args.case + 1, LABELS, len(LABELS))[args.case]
    capture = LayerCapture(pipe.transformer, default_capture_step(args.steps))
    try:
        pipe(label=case["label"], seed=case["seed"], motion=case["motion"], steps=args.steps)
    finally:
        capture.remove()
    frames, height, width = capture.grid
    rows = []
    for index, (q, k, v, scale) in enumerate(tqdm(capture.layers, desc="layers", unit="layer")):
        layout = sv.VideoLayout(frames, height, width, text_tokens=q.shape[-2] - frames * height * width,
                                text_first=capture.text_first)
        scale = q.shape[-1] ** -0.5 if scale is None else scale  # None: SDPA's default, as the model called it
        with torch.no_grad():
            rows.append(layer_row(index, q, k, v, scale, layout, args.density))
    header = (f"{environment()}; testbed-l held-out case {args.case}, {args.steps} steps, q/k/v captured at step "
              f"{default_capture_step(args.steps)}; clustered at density {args.density}, default clusters")
    print(header)
    print(markdown_table(
        ["layer", "plan density", "tiles filled (32 / 64 / 128 rows)", "largest query cluster",
         "kept ranges per query cluster", "tokens per range", "heads taking the tail", "rel-L2 no tail", "with tail"],
        [[r["layer"], f"{r['density']:.3f}", f"{r['fill32']:.2f} / {r['fill64']:.2f} / {r['fill128']:.2f}",
          r["largest_cluster"], f"{r['ranges']:.1f}", f"{r['range_tokens']:.1f}", f"{r['tail_heads']:.2f}",
          f"{r['err_no_tail']:.3f}", f"{r['err_tail']:.3f}"] for r in rows]))
    with open(args.out, "w") as f:
        json.dump(dict(header=header, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
