"""The clustered Triton kernel against oracles built here from per-token cluster labels.

On the CPU the kernel runs under the Triton interpreter (tests/conftest.py). The plan is a stand-in with the
ClusterPlan fields (sparsevid.cluster_plan.ClusterPlan), so the kernel is tested without the planner: ragged
clusters (an empty one and a size-1 one on each side), text first and last, batch 2, per-head and broadcast
plans, transposed (B, L, H, D) inputs. Oracles in float64: dense SDPA with the keep mask built from the
labels (tail off), and the dense softmax with one extra column per dropped non-empty key cluster (tail on).
"""

import math
from collections import namedtuple

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsevid.cluster_plan import cluster_means  # noqa: E402
from sparsevid.kernels.triton_cluster import (HEAD_GRAIN, cluster_attention_triton, cluster_launch,  # noqa: E402
                                              cluster_means_triton)
from sparsevid.layout import VideoLayout  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-3 if CUDA else 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# the ClusterPlan's fields (labels: the test's own per-token truth, not a plan field)
Plan = namedtuple("Plan", "layout q_order q_offsets k_order k_offsets kv_num_clusters kv_clusters k_means")


def ragged_labels(n, clusters, g):
    """Cluster of each of n tokens: skewed sizes, cluster 0 empty, cluster 1 a single token."""
    weights = torch.rand(clusters, generator=g) ** 3 + 0.02
    weights[0] = 0
    weights[1] = 0
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    labels[torch.randint(0, n, (1,), generator=g)] = 1
    return labels


def make_plan(layout, pb, ph, cq, ck, density, k, g, max_extra=3):
    """A random clustered plan over (pb, ph) and its labels ``(lq, lk)``: int64 (pb, ph, V). Every query
    keeps the key cluster of its own token; ``kv_clusters`` ends in garbage past the count."""
    V = layout.video_tokens
    offset = layout.text_tokens if layout.text_first else 0
    lq = torch.stack([torch.stack([ragged_labels(V, cq, g) for _ in range(ph)]) for _ in range(pb)])
    lk = torch.stack([torch.stack([ragged_labels(V, ck, g) for _ in range(ph)]) for _ in range(pb)])
    keep = torch.rand(pb, ph, cq, ck, generator=g) < density
    for b in range(pb):
        for h in range(ph):
            keep[b, h, lq[b, h], lk[b, h]] = True
    num = keep.sum(-1)
    width = int(num.max()) + max_extra
    kv = torch.randint(-5, 10_000, (pb, ph, cq, width), generator=g)
    for b in range(pb):
        for h in range(ph):
            for c in range(cq):
                ids = torch.nonzero(keep[b, h, c]).squeeze(1)
                kv[b, h, c, : ids.numel()] = ids

    def order(labels, n):
        sizes = torch.nn.functional.one_hot(labels, n).sum(2)
        offsets = torch.cat([torch.zeros(pb, ph, 1, dtype=torch.long), sizes.cumsum(-1)], -1)
        return (labels.argsort(dim=-1, stable=True) + offset).int(), offsets.int()

    q_order, q_offsets = order(lq, cq)
    k_order, k_offsets = order(lk, ck)
    video_k = k[:pb, :ph, offset:offset + V].double()  # a broadcast plan's means: of the first batch / head
    onehot = torch.nn.functional.one_hot(lk, ck).double()  # (pb, ph, V, Ck)
    k_means = (onehot.transpose(-1, -2) @ video_k) / onehot.sum(2).clamp_min(1)[..., None]
    plan = Plan(layout, q_order, q_offsets, k_order, k_offsets, num.int(), kv.int(), k_means.float())
    return plan, (lq, lk, keep)


def full_labels(layout, labels):
    """(pb, ph, L) labels in the original order, -1 on the text tokens."""
    offset = layout.text_tokens if layout.text_first else 0
    out = torch.full((*labels.shape[:2], layout.num_tokens), -1, dtype=torch.long)
    out[..., offset:offset + layout.video_tokens] = labels
    return out


def oracle(q, k, v, layout, truth, scale, tail):
    lq, lk, keep = truth
    B, H, L, D = q.shape
    q, k, v = (t.double().cpu() for t in (q, k, v))
    cq_lab = full_labels(layout, lq).expand(B, H, L)
    ck_lab = full_labels(layout, lk).expand(B, H, L)
    keep = keep.expand(B, H, *keep.shape[2:])
    ck = keep.shape[-1]
    text_q, text_k = cq_lab < 0, ck_lab < 0
    pair = torch.gather(keep, 2, cq_lab.clamp_min(0)[..., None].expand(B, H, L, ck))  # (B, H, L, Ck): row's keep
    kept_key = torch.gather(pair, 3, ck_lab.clamp_min(0)[:, :, None, :].expand(B, H, L, L))
    mask = text_q[..., None] | text_k[:, :, None, :] | kept_key
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    values = v
    if tail:
        onehot = torch.nn.functional.one_hot(ck_lab.clamp_min(0), ck).double() * (~text_k)[..., None]
        n = onehot.sum(2)  # (B, H, Ck)
        v_mean = (onehot.transpose(-1, -2) @ v) / n.clamp_min(1)[..., None]
        k_mean = (onehot.transpose(-1, -2) @ k) / n.clamp_min(1)[..., None]  # this call's keys, not the plan's
        t = q @ k_mean.transpose(-1, -2) * scale + n.clamp_min(1).log()[:, :, None, :]
        live = ~pair & ~text_q[..., None] & (n > 0)[:, :, None, :]
        scores = torch.cat([scores, t.masked_fill(~live, float("-inf"))], -1)
        values = torch.cat([v, v_mean], 2)
    return torch.softmax(scores, -1) @ values


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def inputs(layout, B, H, D, dtype, g, transposed):
    L = layout.num_tokens
    shape = (B, L, H, D) if transposed else (B, H, L, D)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    if transposed:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def on_device(plan):
    return plan._replace(**{f: getattr(plan, f).to(DEVICE) for f in plan._fields if f != "layout"})


SMALL = dict(frames=2, height=5, width=7)
CASES = [
    # layout, B, H, D, dtype, transposed, plan (B', H'), Cq, Ck, block_m, gather_kv, packed
    (dict(SMALL, text_tokens=9, text_first=False), 2, 2, 32, torch.float32, False, (2, 2), 7, 9, 16, False, True),
    (dict(SMALL, text_tokens=9, text_first=True), 2, 2, 64, torch.float32, True, (2, 2), 6, 11, 32, True, True),
    (dict(SMALL), 2, 2, 32, torch.float16, True, (2, 2), 9, 8, 16, False, False),
    (dict(SMALL, text_tokens=5, text_first=True), 2, 3, 32, torch.float16, False, (2, 1), 5, 7, 16, True, False),
    (dict(SMALL, text_tokens=20), 2, 2, 48, torch.float16, False, (1, 2), 8, 6, 16, False, True),
]


@pytest.mark.parametrize("tail", [None, "centroid"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_oracle(case, tail):
    lk_, B, H, D, dtype, transposed, (pb, ph), cq, ck, block_m, gather_kv, packed = CASES[case]
    layout = VideoLayout(**lk_)
    g = torch.Generator().manual_seed(case)
    q, k, v = inputs(layout, B, H, D, dtype, g, transposed)
    # the plan made from other keys (a plan reused from an earlier step): the tail's mean keys are this call's
    plan, truth = make_plan(layout, pb, ph, cq, ck, 0.3, k.float() + torch.randn(k.shape, generator=g), g)
    scale = 0.9 / math.sqrt(D)
    out = cluster_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), on_device(plan), scale, tail=tail,
                                   block_m=block_m, gather_kv=gather_kv, packed=packed)
    assert out.shape == q.shape and out.dtype == dtype and out.stride() == q.stride()
    ref = oracle(q, k, v, layout, truth, scale, tail)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    if tail:  # the tail moves the output: the test tells the two apart
        assert rel_err(out, oracle(q, k, v, layout, truth, scale, None)) > 10 * TOL[dtype]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("tail", ["fixed", None])
def test_through_the_backends(tail, backend):
    """fp16 through ``sparse_attention(backend=...)`` with a real ClusterPlan made from other keys (reused from an
    earlier step: the tail's mean keys are this call's), per-head plan, text first; the cluster tail as its
    formula (``fixed()``)."""
    cluster_plan = pytest.importorskip("sparsevid.cluster_plan")
    import sparsevid as sv
    from sparsevid.tail import CLUSTER_TAIL

    tail = CLUSTER_TAIL.fixed() if tail else None

    layout = VideoLayout(frames=2, height=4, width=6, text_tokens=7, text_first=True)
    g = torch.Generator().manual_seed(5)
    q, k, v = inputs(layout, 2, 2, 64, torch.float16, g, True)
    fields, truth = make_plan(layout, 2, 2, 5, 6, 0.3, k.float() + torch.randn(k.shape, generator=g), g)
    plan = cluster_plan.ClusterPlan(*fields).to(DEVICE)
    out = sv.sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), plan, backend=backend, tail=tail)
    ref = oracle(q, k, v, layout, truth, 64 ** -0.5, tail is not None)
    assert rel_err(out, ref) < TOL[torch.float16]


def test_equal_query_clusters_take_tiles_of_their_size():
    """A ``q_partition="kdtree"`` plan (query clusters of 12 rows, ``max_q_size=12``) runs in tiles of 16 rows, one
    tile a cluster, and equals the reference twin with and without the cluster tail; a k-means plan keeps the
    default height."""
    import sparsevid as sv
    from sparsevid.kernels.reference_cluster import sparse_attention_reference_clusters

    layout = VideoLayout(frames=2, height=4, width=6, text_tokens=5, text_first=False)
    g = torch.Generator().manual_seed(3)
    q, k, v = inputs(layout, 1, 2, 32, torch.float16, g, False)
    plan = sv.plan(q, k, layout, "clustered", density=0.3, q_clusters=4, k_clusters=6, q_partition="kdtree")
    assert plan.max_q_size == 12
    launch = cluster_launch(plan.to(DEVICE))
    assert launch.block_m == 16 and int((launch.tiles[..., 0] >= 0).sum()) == 2 * 4
    assert cluster_launch(sv.plan(q, k, layout, "clustered", density=0.3, q_clusters=4).to(DEVICE)).block_m == (
        16 if not CUDA else 64)
    for tail in (None, "fixed"):
        gate = None if tail is None else torch.zeros(1, 2)
        out = cluster_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), plan.to(DEVICE), 32 ** -0.5,
                                       tail=None if tail is None else "centroid",
                                       gate=None if gate is None else gate.to(DEVICE))
        ref = sparse_attention_reference_clusters(q.float(), k.float(), v.float(), plan, 32 ** -0.5, gate)
        assert rel_err(out, ref) < TOL[torch.float16]


def test_the_kernel_reads_a_given_gate_as_the_reference_does():
    """fp32, the kernel called directly with per-head gates (``log w``: 0, ``-inf`` = the tail skipped, and in
    between) against the reference twin given the same gate; a head at 0 is the formula, at ``-inf`` no tail."""
    import sparsevid as sv
    from sparsevid.kernels.reference_cluster import sparse_attention_reference_clusters

    layout = VideoLayout(frames=2, height=4, width=6, text_tokens=5, text_first=True)
    g = torch.Generator().manual_seed(11)
    q, k, v = inputs(layout, 2, 3, 32, torch.float32, g, False)
    fields, truth = make_plan(layout, 2, 3, 5, 6, 0.3, k, g)
    gate = torch.tensor([[0.0, float("-inf"), -1.5], [-0.9, -3.0, 0.0]])
    scale = 32 ** -0.5
    out = cluster_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), on_device(fields), scale,
                                   gate=gate.to(DEVICE))
    ref = sparse_attention_reference_clusters(q, k, v, sv.ClusterPlan(*fields), scale, gate)
    assert rel_err(out, ref.double()) < TOL[torch.float32]
    formula, dropped = (oracle(q, k, v, layout, truth, scale, t) for t in (True, False))
    assert rel_err(out[0, 0], formula[0, 0]) < TOL[torch.float32]
    assert rel_err(out[0, 1], dropped[0, 1]) < TOL[torch.float32]
    for b, h in ((0, 2), (1, 0), (1, 1)):  # a weight in between moves the output off both
        assert min(rel_err(out[b, h], formula[b, h]), rel_err(out[b, h], dropped[b, h])) > 10 * TOL[torch.float32]
    with pytest.raises(ValueError, match="gate"):
        cluster_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), on_device(fields), gate=gate[:1])
    with pytest.raises(ValueError, match=r"means\[1\]"):
        cluster_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), on_device(fields),
                                 means=(torch.zeros(2, 3, 6, 32, device=DEVICE),
                                        torch.zeros(2, 3, 5, 32, device=DEVICE)))


def test_the_decision_through_the_triton_backend():
    """fp16 through ``sparse_attention(backend="triton")``, the call deciding: the planted overshoot (see
    tests/test_clustered.py) falls back to dropping, within 1e-3 of ``tail=None``; keys identical within each
    key cluster keep the tail (log w = 0) and equal dense attention."""
    import sparsevid as sv
    from test_clustered import hand_plan, planted_overshoot

    from sparsevid.tail import decide_cluster_tail

    q, k, v, plan = planted_overshoot(dim=64)
    q, k, v, plan = q.half().to(DEVICE), k.half().to(DEVICE), v.half().to(DEVICE), plan.to(DEVICE)
    assert torch.equal(decide_cluster_tail(q, k, v, plan, 64 ** -0.5).cpu(), torch.full((2, 2), float("-inf")))
    dropped = sv.sparse_attention(q, k, v, plan, tail=None, backend="triton")
    decided = sv.sparse_attention(q, k, v, plan, tail="centroid", backend="triton")
    assert (decided.float() - dropped.float()).abs().max() <= 1e-3

    layout = VideoLayout(frames=2, height=4, width=6, text_tokens=7, text_first=False)
    V = layout.video_tokens
    g = torch.Generator().manual_seed(13)
    q, k, v = inputs(layout, 2, 2, 64, torch.float16, g, False)  # fp16 values, exact in float32
    q_lab = torch.randint(0, 3, (2, 2, V), generator=g)
    k_lab = 2 * q_lab + torch.randint(0, 2, (2, 2, V), generator=g)  # query cluster c keeps key clusters 2c, 2c + 1
    k[:, :, :V] = torch.randn(2, 2, 6, 64, generator=g).half().gather(2, k_lab[..., None].expand(-1, -1, -1, 64))
    keep = torch.zeros(2, 2, 3, 6, dtype=torch.bool)
    keep.view(2, 2, -1).scatter_(2, q_lab * 6 + k_lab, True)
    plan = hand_plan(layout, q_lab, k_lab, keep, k.float()).to(DEVICE)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    assert torch.equal(decide_cluster_tail(q, k, v, plan, 64 ** -0.5).cpu(), torch.zeros(2, 2))
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert rel_err(sv.sparse_attention(q, k, v, plan, backend="triton"), dense.cpu()) < TOL[torch.float16]
    assert rel_err(sv.sparse_attention(q, k, v, plan, tail=None, backend="triton"), dense.cpu()) > 1e-2


def test_tail_exact_for_constant_keys_in_each_cluster():
    """Keys equal within each key cluster: one centroid term is the cluster's exact mass, so the clustered
    output with the tail equals dense attention (whatever the plan keeps)."""
    layout = VideoLayout(frames=1, height=6, width=8, text_tokens=6)
    g = torch.Generator().manual_seed(7)
    q, k, v = inputs(layout, 2, 2, 32, torch.float32, g, False)
    plan, (lq, lk, _) = make_plan(layout, 2, 2, 6, 8, 0.2, k, g)
    k = k.clone()
    video = k[:, :, : layout.video_tokens]
    video.copy_(plan.k_means.gather(2, lk[..., None].expand(-1, -1, -1, 32)))
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = cluster_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), on_device(plan))
    # exact up to float32 rounding: 1e-5 under the interpreter; on CUDA the kernel's float32 tl.dot runs in TF32
    # (10-bit mantissa, ~5e-4 per product; 9e-4 measured on an H100), hence TOL's 2e-3 there
    assert rel_err(out, dense) < TOL[torch.float32]
    dropped = cluster_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), on_device(plan), tail=None)
    assert rel_err(dropped, dense) > 1e-2


def test_cluster_means_match_labels():
    """The PyTorch segment means and their Triton twin against means taken over the labels."""
    layout = VideoLayout(frames=2, height=3, width=5, text_tokens=4, text_first=True)
    g = torch.Generator().manual_seed(3)
    q, k, v = inputs(layout, 2, 3, 16, torch.float16, g, True)
    plan, (_, lk, _) = make_plan(layout, 1, 3, 4, 6, 0.5, k.float(), g)
    means = cluster_means(v, plan)
    video = v[:, :, 4:].double()
    onehot = torch.nn.functional.one_hot(lk, 6).double().expand(2, 3, -1, -1)
    ref = (onehot.transpose(-1, -2) @ video) / onehot.sum(2).clamp_min(1)[..., None]
    assert means.dtype == torch.float32 and means.shape == (2, 3, 6, 16)
    assert torch.allclose(means.double(), ref, atol=1e-6)
    assert (means[:, :, 0] == 0).all()  # the empty cluster
    fast = cluster_means_triton(v.to(DEVICE), cluster_launch(on_device(plan)))
    assert fast.dtype == torch.float32 and fast.shape == (2, 3, 6, 16)
    assert torch.allclose(fast.double().cpu(), ref, atol=1e-6)


def test_launch_tiles_and_merged_ranges():
    """Tiles cover every video row once, per cluster, with no tile across clusters; ranges cover exactly the
    kept key positions, adjacent kept clusters merged into one range."""
    layout = VideoLayout(frames=2, height=5, width=7)
    g = torch.Generator().manual_seed(11)
    k = torch.randn(1, 2, layout.num_tokens, 16, generator=g)
    plan, (lq, lk, keep) = make_plan(layout, 1, 2, 9, 10, 0.5, k, g)
    launch = cluster_launch(plan, block_m=16)
    V = layout.video_tokens
    for h in range(2):
        tiles = launch.tiles[0, h]
        real = tiles[tiles[:, 0] >= 0]
        sizes = plan.q_offsets[0, h].diff()
        assert real.shape[0] == int(((sizes + 15) // 16).sum())
        covered = torch.zeros(V, dtype=torch.long)
        for c, r0, r1 in real.tolist():
            assert plan.q_offsets[0, h, c] <= r0 < r1 <= plan.q_offsets[0, h, c + 1]
            covered[r0:min(r0 + 16, r1)] += 1
        assert (covered == 1).all()
        for c in range(9):
            got = torch.zeros(V, dtype=torch.bool)
            n = int(launch.range_num[0, h, c])
            cum, shift = launch.range_cum[0, h, c].long(), launch.range_shift[0, h, c].long()
            assert (cum[n:] == 2**31 - 1).all() and cum.shape[0] == plan.kv_clusters.shape[-1]  # the plan's width
            ranges = [((cum[r - 1] if r else 0) + shift[r], cum[r] + shift[r]) for r in range(n)]
            for lo, hi in ranges:
                got[lo:hi] = True
            ids = torch.nonzero(keep[0, h, c]).squeeze(1)
            assert torch.equal(got, keep[0, h, c][lk[0, h].sort(stable=True).values])
            packed = torch.arange(int(launch.kept_num[0, h, c]))  # packed index -> position, by the search's rule
            r = (cum[None, :] <= packed[:, None]).sum(1)
            assert torch.equal(packed + shift[r], torch.nonzero(got).squeeze(1))
            # the packed walk's grain table: the range of every HEAD_GRAIN-th packed index (range_num past the end)
            grain = torch.arange(launch.range_head.shape[-1]) * HEAD_GRAIN
            assert torch.equal(launch.range_head[0, h, c].long(), (cum[None, :n] <= grain[:, None]).sum(1))
            starts, prev_ends = plan.k_offsets[0, h, ids[1:]], plan.k_offsets[0, h, ids[:-1] + 1]
            runs = int((starts != prev_ends).sum()) + 1 if ids.numel() else 0
            assert len(ranges) == runs
            assert torch.equal(launch.kept[0, h, c].bool(), keep[0, h, c])


def test_refusals():
    layout = VideoLayout(frames=1, height=4, width=4)
    g = torch.Generator().manual_seed(0)
    q, k, v = inputs(layout, 1, 1, 32, torch.float32, g, False)
    plan, _ = make_plan(layout, 1, 1, 3, 3, 0.5, k, g)
    if CUDA:  # without the interpreter, CPU tensors are refused before anything else is looked at
        with pytest.raises(ValueError, match="on cuda"):
            cluster_attention_triton(q, k, v, plan)
    q, k, v, plan = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), on_device(plan)
    with pytest.raises(ValueError, match="head_dim"):
        q8 = q[..., :8].contiguous()
        cluster_attention_triton(q8, q8, q8, plan._replace(k_means=plan.k_means[..., :8]))
    with pytest.raises(ValueError, match="dtype"):
        cluster_attention_triton(q.double(), k.double(), v.double(), plan)
    with pytest.raises(ValueError, match="dtype"):
        cluster_attention_triton(q, k.half(), v, plan)
    with pytest.raises(ValueError, match="num_tokens"):
        cluster_attention_triton(q[:, :, :8], k[:, :, :8], v[:, :, :8], plan)
    with pytest.raises(ValueError, match="tail"):
        cluster_attention_triton(q, k, v, plan, tail="pooled-var")
    with pytest.raises(ValueError, match="block_m"):
        cluster_attention_triton(q, k, v, plan, block_m=24)
    with pytest.raises(ValueError, match="batch, heads"):
        cluster_attention_triton(q, k, v, plan._replace(q_order=plan.q_order.expand(3, 1, -1)))


@pytest.mark.skipif(not CUDA, reason="bf16 tl.dot is wrong under the Triton interpreter (CPU); checked on CUDA")
@pytest.mark.parametrize("dtype, gather_kv, block_m, packed", [
    (torch.float16, False, 64, True), (torch.bfloat16, True, 64, False), (torch.bfloat16, False, 128, False),
    (torch.float16, True, 128, True)])
def test_cuda(dtype, gather_kv, block_m, packed):
    layout = VideoLayout(frames=3, height=13, width=21, text_tokens=40)
    g = torch.Generator().manual_seed(block_m)
    q, k, v = inputs(layout, 2, 3, 128, dtype, g, True)
    plan, truth = make_plan(layout, 2, 3, 40, 50, 0.15, k.float(), g)
    for tail in (None, "centroid"):
        out = cluster_attention_triton(q.cuda(), k.cuda(), v.cuda(), on_device(plan), tail=tail, block_m=block_m,
                                       gather_kv=gather_kv, packed=packed)
        ref = oracle(q, k, v, layout, truth, 128 ** -0.5, tail)
        assert rel_err(out, ref) < TOL[dtype]


_COMPILE = """
from sparsevid.kernels import triton_cluster as tc

half, i32 = "*fp16", "*i32"
pointers = dict(Q=half, K=half, V=half, Out=half, KG=half, VG=half, QOrder=i32, KOrder=i32, Tiles=i32,
                RangeNum=i32, RangeCum=i32, RangeShift=i32, RangeHead="*i16", KeptNum=i32, Kept="*u8", LogN="*fp32",
                KMeans=half, VMeans=half, Gate="*fp32", sm_scale="fp32")
for packed, gathered, tail in ((True, True, True), (False, False, False)):
    constants = dict(HEAD_DIM=128, HEAD_DIM_P=128, BLOCK_M=64, BLOCK_N=64, BLOCK_T=64, TAIL=tail,
                     PRE_GATHERED=gathered, PACKED=packed, LOG_R=9, GRAIN=256, NUM_STAGES=3)
    print("shared", build(tc._cluster_attn_fwd.fn, pointers, constants, num_warps=4, num_stages=3).metadata.shared)
build(tc._cluster_means, dict(V=half, KOrder=i32, KOffsets=i32, Out="*fp32"),
      dict(HEAD_DIM=128, HEAD_DIM_P=128, ROWS=32), num_warps=4)
"""


def test_compiles_for_hopper():
    """The interpreter runs what the compiler may refuse (it refused a constexpr reassigned in a static loop):
    both walks and the mean-values kernel compile for sm_90 with the ptxas Triton ships (no GPU needed; a
    process without the interpreter)."""
    from sm90 import compile_sm90

    run = compile_sm90(_COMPILE)
    shared = [int(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("shared")]
    assert len(shared) == 2 and max(shared) <= 100 * 1024  # several programs per SM (H100: 227 KB)
