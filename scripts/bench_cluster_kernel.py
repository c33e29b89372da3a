"""Time the clustered Triton kernel (``sparsevid.kernels.triton_cluster``) at a real model's shape, beside dense
SDPA and the ``triton`` block-sparse kernel at the same kept-token count, and check its rows at that shape.

Synthetic clusters: per head, ``--q-clusters`` / ``--k-clusters`` clusters of uneven sizes (log-normal,
sigma ``--spread``, at least one token) over randomly scattered video tokens; each query cluster keeps random
key clusters until ``--density`` of the video keys are kept. The block-sparse contender is a ``random`` plan at
the clustered plan's density. Timing: CUDA events, warm-up, median of ``--reps`` (``bench.common.time_ms``);
each clustered variant's time includes its per-call work (the mean keys and values of the tail, the k/v gather), not
the launch struct, derived once per plan (timed separately). Check: ``--check-rows`` random video rows per head
against a float32 PyTorch evaluation of the same formula.

``--flashinfer``: FlashInfer's ``VariableBlockSparseAttentionWrapper`` (SVG2's executor: variable-size blocks,
token-level KV indices) on the same plan beside ours, tail off (it has none: a cluster tail would be a second pass
merged by LSE), video tokens only: its ``plan`` (host syncs; once per plan), its kernel on q/k/v already in cluster
order, and a whole call (the gathers into cluster order, the kernel, the scatter back).

    PYTHONPATH=src python scripts/bench_cluster_kernel.py                # Wan2.1-1.3B 480p: B=1, 12 heads, L=32760
    TRITON_INTERPRET=1 PYTHONPATH=src python scripts/bench_cluster_kernel.py --device cpu --frames 1 --height 8 \
        --width 8 --heads 2 --q-clusters 6 --k-clusters 6 --dtype float16 --reps 1   # smoke test
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from sparsevid.lab.bench.common import environment, markdown_table, time_ms
from sparsevid.cluster_plan import cluster_means
from sparsevid.layout import VideoLayout


# (packed, gather_kv, tail): the tile walks compared with the tail off, then the tail's cost
VARIANTS = [(False, False, None), (False, True, None), (True, False, None), (True, True, None),
            (True, False, "centroid"), (False, False, "centroid")]


def synthetic_plan(layout, heads, cq, ck, density, spread, head_dim, k, g):
    """A clustered plan's fields (one batch, ``heads`` heads) and per-token labels ``(lq, lk)`` and ``keep``."""
    V, dev = layout.video_tokens, k.device
    offset = layout.text_tokens if layout.text_first else 0

    def clusters(n):
        sizes = torch.exp(spread * torch.randn(heads, n, generator=g, device=dev))
        sizes = (sizes / sizes.sum(-1, keepdim=True) * (V - n)).floor().long() + 1  # >= 1 token each
        sizes[:, -1] += V - sizes.sum(-1)
        offsets = torch.cat([torch.zeros(heads, 1, dtype=torch.long, device=dev), sizes.cumsum(-1)], -1)
        order = torch.stack([torch.randperm(V, generator=g, device=dev) for _ in range(heads)]) + offset
        labels = torch.full((heads, layout.num_tokens), -1, dtype=torch.long, device=dev)
        pos = torch.arange(V, device=dev).expand(heads, V).contiguous()
        labels.scatter_(1, order, torch.searchsorted(offsets[:, 1:].contiguous(), pos, right=True))
        return order[None].int(), offsets[None].int(), sizes, labels[None]

    q_order, q_offsets, _, lq = clusters(cq)
    k_order, k_offsets, k_sizes, lk = clusters(ck)
    priority = torch.rand(heads, cq, ck, generator=g, device=dev).argsort(-1)
    sz = k_sizes[:, None, :].expand(heads, cq, ck).gather(-1, priority)
    first = (sz.cumsum(-1) - sz) < density * V  # keep in priority order until the budget is reached
    keep = torch.zeros(heads, cq, ck, dtype=torch.bool, device=dev).scatter_(-1, priority, first)
    num = keep.sum(-1)
    ids = torch.where(keep, torch.arange(ck, device=dev), ck).sort(-1).values[..., : int(num.max())]
    k_means = cluster_means(k, SimpleNamespace(k_order=k_order, k_offsets=k_offsets))[:1]  # the mean KEY: a segment mean of k
    fields = SimpleNamespace(layout=layout, q_order=q_order, q_offsets=q_offsets, k_order=k_order,
                             k_offsets=k_offsets, kv_num_clusters=num[None].int(), kv_clusters=ids[None].int(),
                             k_means=k_means)
    kept_tokens = (keep.long() * k_sizes[:, None, :]).sum(-1)  # (H, Cq)
    q_sizes = q_offsets[0].diff(dim=-1).long()
    T, L = layout.text_tokens, layout.num_tokens
    entries = (q_sizes * (kept_tokens + T)).sum(-1) + T * L  # per head
    return fields, (lq, lk, keep[None]), (entries.double() / L**2).mean().item()


def check_rows(out, q, k, v, fields, truth, scale, tail, rows):
    """Rel-L2 error of ``out`` on video ``rows`` against the formula in float32 PyTorch."""
    lq, lk, keep = truth
    B, H, L, D = q.shape
    qr = q[:, :, rows].float()
    s = qr @ k.float().transpose(-1, -2) * scale  # (B, H, R, L)
    c = lq[:, :, rows]  # (1, H, R)
    keep_r = keep.gather(2, c[..., None].expand(-1, -1, -1, keep.shape[-1]))  # (1, H, R, Ck)
    kept = keep_r.gather(3, lk.clamp_min(0)[:, :, None, :].expand(-1, -1, len(rows), -1)) | (lk < 0)[:, :, None, :]
    s = s.masked_fill(~kept, float("-inf"))
    values = v.float()
    if tail:
        n = fields.k_offsets.diff(dim=-1).float()
        t = qr @ cluster_means(k, fields).transpose(-1, -2) * scale + n.clamp_min(1).log()[:, :, None, :]
        s = torch.cat([s, t.masked_fill(keep_r | (n == 0)[:, :, None, :], float("-inf"))], -1)
        values = torch.cat([values, cluster_means(v, fields)], 2)
    ref = torch.softmax(s, -1) @ values
    return ((out[:, :, rows].float() - ref).norm() / ref.norm()).item()


def flashinfer_rows(q, k, v, fields, keep, density, scale, timer, dense_ms, check):
    """Result rows of FlashInfer's variable-block-sparse kernel on the plan ``fields`` (one batch, video only;
    ``keep``: bool ``(H, Cq, Ck)``; ``check(out)``: the rows' error of a ``(1, H, L, D)`` output)."""
    try:
        import flashinfer
    except ImportError as exc:
        return [[f"FlashInfer: not importable ({exc})", "-", float("nan"), float("nan"), float("nan"), "-"]]
    if fields.layout.text_tokens:
        raise SystemExit("--flashinfer times video tokens only: run it with --text-tokens 0")
    _, H, L, D = q.shape
    row_sz, col_sz = (fields.q_offsets[0].diff(dim=-1).int(), fields.k_offsets[0].diff(dim=-1).int())
    q_order, k_order = fields.q_order[0].long(), fields.k_order[0].long()  # (H, V): video tokens from 0 (no text)
    wrapper = flashinfer.VariableBlockSparseAttentionWrapper(
        torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=q.device))

    def plan():
        wrapper.plan(keep, row_sz, col_sz, H, H, D, sm_scale=scale, q_data_type=q.dtype)

    def sort(x, order):
        return x[0].gather(1, order[..., None].expand(-1, -1, D))  # (H, V, D) in cluster order

    def call():
        out = wrapper.run(sort(q, q_order), sort(k, k_order), sort(v, k_order)).reshape(H, -1, D)
        return torch.empty_like(q[0]).scatter_(1, q_order[..., None].expand(-1, -1, D), out)[None]

    plan_ms = time_ms(plan, **dict(timer, reps=3))
    qs, ks, vs = sort(q, q_order), sort(k, k_order), sort(v, k_order)
    kernel_ms = time_ms(lambda: wrapper.run(qs, ks, vs), **timer)
    call_ms = time_ms(call, **timer)
    err = f"{check(call()):.2e}"
    name = f"FlashInfer {flashinfer.__version__} variable block-sparse"
    return [[f"{name}, kernel on sorted q/k/v", f"{plan_ms:.3f} (plan)", density, kernel_ms, dense_ms / kernel_ms, err],
            [f"{name}, whole call (sort q/k/v, kernel, scatter back)", "-", density, call_ms, dense_ms / call_ms, err]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--height", type=int, default=30)
    p.add_argument("--width", type=int, default=52)
    p.add_argument("--text-tokens", type=int, default=0)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--q-clusters", type=int, default=512)
    p.add_argument("--k-clusters", type=int, default=512)
    p.add_argument("--density", type=float, default=0.1, help="kept fraction of the video keys per query cluster")
    p.add_argument("--spread", type=float, default=0.8, help="sigma of the log-normal cluster sizes")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--block-m", type=int, nargs="+", default=[64, 128], help="query rows per tile to time")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[128, 64],
                   help="block sizes of the block-sparse contender (a random plan at the clustered plan's density)")
    p.add_argument("--configs", nargs="+", default=["64:4:3", "64:8:2", "128:8:2"], metavar="BLOCK_N:WARPS:STAGES",
                   help="kernel configs to time each variant with (the autotuner bypassed: its compiles took minutes); "
                        "the fastest is reported")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--check-rows", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flashinfer", action="store_true", help="also FlashInfer's variable block-sparse kernel (tail off)")
    args = p.parse_args()

    import sparsevid as sv
    from sparsevid.kernels.triton_blocksparse import block_sparse_attn, launch_tables
    from sparsevid.kernels.triton_cluster import (cluster_attention_triton, cluster_launch,
                                                  cluster_means_triton)

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    layout = VideoLayout(frames=args.frames, height=args.height, width=args.width, text_tokens=args.text_tokens)
    B, H, L, D = 1, args.heads, layout.num_tokens, args.head_dim
    g = torch.Generator(device=dev).manual_seed(args.seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, device=dev).to(dtype) for _ in range(3))
    scale = D ** -0.5
    fields, truth, density = synthetic_plan(layout, H, args.q_clusters, args.k_clusters, args.density, args.spread,
                                            D, k, g)
    timer = dict(reps=args.reps, warmup=3, device=dev.type)
    rows_idx = torch.randperm(layout.video_tokens, generator=g, device=dev)[: args.check_rows]
    rows_idx += layout.text_tokens if layout.text_first else 0

    results = []
    dense_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), **timer)
    results.append(["SDPA dense", "-", 1.0, dense_ms, 1.0, "-"])
    for size in args.block_sizes:  # the block-sparse kernel at tile heights the clustered tiles are compared with
        grid = VideoLayout(frames=args.frames, height=args.height, width=args.width, text_tokens=args.text_tokens,
                           block_size=size)
        block = sv.plan(q, k, grid, method="random", density=density)
        num, idx = block.kv_num_blocks.expand(B, H, -1), block.kv_indices.expand(B, H, -1, -1)
        real, order = launch_tables(block.perm, num, size, B, H)
        bs_ms = time_ms(lambda: block_sparse_attn(q, k, v, block.perm, num, idx, size, scale, real, order), **timer)
        results.append([f"triton block-sparse (random, {size})", "-", block.density, bs_ms, dense_ms / bs_ms, "-"])
    if args.flashinfer:
        results += flashinfer_rows(q, k, v, fields, truth[2][0], density, scale, timer, dense_ms,
                                   lambda out: check_rows(out, q, k, v, fields, truth, scale, None, rows_idx))
    for bm in args.block_m:
        launch_ms = time_ms(lambda: cluster_launch(fields, bm), **timer)
        launch = cluster_launch(fields, bm)
        if bm == args.block_m[0]:  # the tail's mean keys (and values: the same cost), a part of every tail=centroid time below
            for name, means in (("torch", lambda: cluster_means(v, fields)),
                                ("triton", lambda: cluster_means_triton(v, launch))):
                results.append([f"cluster means of v ({name})", "-", density, time_ms(means, **timer), float("nan"), "-"])
        for packed, gather, tail in VARIANTS:
            timed = []
            for text in args.configs:
                bn, warps, stages = (int(x) for x in text.split(":"))
                config = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)

                def fn():
                    return cluster_attention_triton(q, k, v, fields, scale, tail=tail, launch=launch,
                                                    gather_kv=gather, packed=packed, config=config)
                timed.append((time_ms(fn, **timer), text, fn))
            ms, best, fn = min(timed, key=lambda t: t[0])
            err = check_rows(fn(), q, k, v, fields, truth, scale, tail, rows_idx)
            name = (f"clustered bm={bm} {'packed' if packed else 'by range'} "
                    f"{'gathered k/v' if gather else 'k/v via k_order'} tail={tail} [{best}; "
                    + " ".join(f"{c}:{t:.2f}" for t, c, _ in timed) + "]")
            results.append([name, f"{launch_ms:.3f}", density, ms, dense_ms / ms, f"{err:.2e}"])
    print(f"# clustered kernel: B={B} H={H} L={L} D={D} {args.dtype}, {args.q_clusters}/{args.k_clusters} clusters "
          f"(log-normal sigma {args.spread}), kept {args.density} of the keys; {environment()}")
    print(markdown_table(["kernel", "launch struct ms", "density", "ms", "vs dense", "rows rel-L2"],
                         [[r[0], r[1], f"{r[2]:.4f}", f"{r[3]:.3f}", f"{r[4]:.2f}x", r[5]] for r in results]))


if __name__ == "__main__":
    main()
