"""The clustered method's per-call cost split at a real model's shape, through the public API: clustering and
selection (``sv.plan(method="clustered")``, cold and warm-started), the clustered kernel with and without the
cluster tail, beside dense SDPA and ``draft`` (planning + kernel) at the same density, all in one process.

Inputs: random q/k/v (the clustering and kernel costs depend on the shape and cluster sizes, not on what the
clusters mean) or ``--inputs clip`` (q/k/v from a real clip's pixels, ``sparsevid.lab.data.attention_inputs``).
Timing: CUDA events, warm-up, median of ``--reps`` (``lab.bench.common.time_ms``). ``--engines`` compares the
k-means assignment engines (``flash-kmeans`` when installed, the chunked PyTorch matmul).

    PYTHONPATH=src python scripts/bench_clustered_cost.py --shapes wan1.3b-480p wan14b-720p
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

import sparsevid as sv
from sparsevid.kernels.triton_cluster import ClusterLaunch, cluster_attention_triton
from sparsevid.lab.bench.common import environment, markdown_table, time_ms
from sparsevid.planners import clustered as clustered_module

SHAPES = {  # (heads, frames, height, width, head_dim): the transformers' self-attention after patchify
    "wan1.3b-480p": (12, 21, 30, 52, 128),
    "wan14b-720p": (40, 21, 45, 80, 128),
}


@contextlib.contextmanager
def engine(name: str):
    """Force the k-means assignment engine: "flash" (flash-kmeans, if installed) or "torch"."""
    saved = clustered_module._flash_kmeans
    if name == "torch":
        clustered_module._flash_kmeans = lambda: None
    try:
        yield
    finally:
        clustered_module._flash_kmeans = saved


def run(shape: str, args) -> list[list]:
    heads, frames, height, width, D = SHAPES[shape]
    layout = sv.VideoLayout(frames, height, width)
    L = layout.num_tokens
    dtype = getattr(torch, args.dtype)
    if args.inputs == "clip":
        from sparsevid.lab.data import attention_inputs
        q, k, v = attention_inputs(layout=layout, heads=heads, head_dim=D, dtype=dtype, device="cuda")
    else:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, heads, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    rows = []
    dense = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), reps=args.reps)
    rows.append([shape, "dense SDPA", "-", f"{dense:.3f}", "1.00"])

    def row(name, ms, density="-"):
        rows.append([shape, name, density, f"{ms:.3f}", f"{ms / dense:.2f}"])

    for density in args.densities:
        draft_plan = sv.plan(q, k, layout, method="draft", density=density, validate=False)
        row(f"draft plan @{density}", time_ms(lambda: sv.plan(q, k, layout, method="draft", density=density,
                                                               validate=False), reps=args.reps), f"{draft_plan.density:.3f}")
        row(f"draft kernel (triton) @{density}",
            time_ms(lambda: sv.sparse_attention(q, k, v, draft_plan, backend="triton"), reps=args.reps),
            f"{draft_plan.density:.3f}")
        for eng in args.engines:
            with engine(eng):
                opts = dict(method="clustered", density=density, q_clusters=args.clusters, k_clusters=args.clusters,
                            validate=False)
                cold = sv.plan(q, k, layout, **opts)
                row(f"clustered plan cold ({eng}, {clustered_module._COLD_ITERS} it) @{density}",
                    time_ms(lambda: sv.plan(q, k, layout, **opts), reps=max(3, args.reps // 4)), f"{cold.density:.3f}")
                for iters in args.warm_iters:
                    row(f"clustered plan warm ({eng}, {iters} it) @{density}",
                        time_ms(lambda: sv.plan(q, k, layout, centroids=cold.centroids, iters=iters, **opts),
                                reps=args.reps), f"{cold.density:.3f}")
                if "kdtree" in args.q_partitions:
                    kd_opts = dict(opts, q_partition="kdtree")
                    kd = sv.plan(q, k, layout, **kd_opts)
                    for iters in args.warm_iters:
                        row(f"clustered plan q_partition=kdtree, keys warm ({eng}, {iters} it) @{density}",
                            time_ms(lambda: sv.plan(q, k, layout, centroids=kd.centroids, iters=iters, **kd_opts),
                                    reps=args.reps), f"{kd.density:.3f}")
        q_sizes = cold.q_offsets.diff(dim=-1).float()
        fill = {bm: (q_sizes.sum() / ((q_sizes / bm).ceil() * bm).sum()).item() for bm in (32, 64, 128)}
        rows.append([shape, f"clustered plan @{density}: query tiles filled " + ", ".join(
            f"{f:.2f} (block_m {bm})" for bm, f in fill.items()) + f"; largest query / key cluster "
            f"{int(q_sizes.max())} / {int(cold.k_offsets.diff(dim=-1).max())}", f"{cold.density:.3f}", "-", "-"])
        plans = [("kmeans", cold)] + ([("kdtree", kd)] if "kdtree" in args.q_partitions else [])
        for name, plan in plans:
            for tail in (None, "centroid"):
                row(f"clustered kernel (triton, q_partition={name}, tail={tail}) @{density}",
                    time_ms(lambda: sv.sparse_attention(q, k, v, plan, backend="triton", tail=tail), reps=args.reps),
                    f"{plan.density:.3f}")
            # the walk: on equal synthetic clusters range by range beat packed (docs/kernel-notes.md)
            for packed in (True, False):
                row(f"clustered kernel alone (q_partition={name}, {'packed' if packed else 'range by range'}, "
                    f"tail=None) @{density}",
                    time_ms(lambda: cluster_attention_triton(q, k, v, plan, tail=None, packed=packed,
                                                         launch=plan.launch(ClusterLaunch, None)), reps=args.reps),
                    f"{plan.density:.3f}")
        if args.profile:  # GPU and host time of a warm plan, then of calls with the tail on a reused plan
            for what, step in (("warm plan, 2 it", lambda: sv.plan(q, k, layout, centroids=cold.centroids, iters=2,
                                                                    **opts)),
                               ("call with the tail, reused plan", lambda: sv.sparse_attention(
                                   q, k, v, cold, backend="triton", tail="centroid"))):
                step()
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                print(f"# {shape} @{density}: 3 x {what}, by GPU time (host time beside it)")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["wan1.3b-480p"], choices=sorted(SHAPES))
    p.add_argument("--densities", type=float, nargs="+", default=[0.1])
    p.add_argument("--clusters", type=int, default=512, help="query and key clusters per head")
    p.add_argument("--warm-iters", type=int, nargs="+", default=[1, 2])
    p.add_argument("--engines", nargs="+", default=["flash", "torch"], choices=["flash", "torch"])
    p.add_argument("--inputs", default="random", choices=["random", "clip"])
    p.add_argument("--q-partitions", nargs="+", default=["kmeans"], choices=["kmeans", "kdtree"],
                   help="query partitions timed (kmeans always; kdtree adds its plan and kernel rows)")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="print the GPU time by kernel of warm plans and calls")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    print(environment())
    rows = []
    for shape in args.shapes:
        rows += run(shape, args)
        print(markdown_table(["shape", "what", "density", "ms", "x dense"], rows))


if __name__ == "__main__":
    main()
