"""The clustered layout (issue 30): the ``clustered`` planner's ClusterPlan, its reference execution with and
without the cluster tail against oracles written here from per-token cluster labels, planted clusters that tile
plans cannot see, the warm start on the next denoising step of the small testbed, the integration's centroids
per layer and CFG branch, and the options refused."""

import math

import pytest
import torch
import torch.nn.functional as F

import sparsevid as sv
from sparsevid.planners import TokenCountError
from sparsevid.tail import CLUSTER_TAIL, decide_cluster_tail

DENSE_TEXT = [dict(text_tokens=6, text_first=True), dict(text_tokens=5, text_first=False), dict()]


def inputs(layout, batch=2, heads=3, dim=16, seed=0):
    """q, k, v; k near q (as in trained models, where a token's query and key clusters overlap)."""
    g = torch.Generator().manual_seed(seed)
    q, noise, v = (torch.randn(batch, heads, layout.num_tokens, dim, generator=g) for _ in range(3))
    return q, q + 0.5 * noise, v


def token_labels(order, offsets, num_tokens):
    """Per (b, h), the cluster of each original token (-1: not in the order), by walking the offsets."""
    B, H, _ = order.shape
    labels = torch.full((B, H, num_tokens), -1, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            for c in range(offsets.shape[-1] - 1):
                labels[b, h, order[b, h, offsets[b, h, c]:offsets[b, h, c + 1]].long()] = c
    return labels


def kept_sets(plan):
    return [[[set(plan.kv_clusters[b, h, c, :plan.kv_num_clusters[b, h, c]].tolist())
              for c in range(plan.num_q_clusters)] for h in range(plan.shape[1])] for b in range(plan.shape[0])]


def oracle_mask(plan):
    """keep[i, j] = text(i) or text(j) or cluster(j) kept by cluster(i), from per-token labels."""
    L = plan.layout.num_tokens
    lq = token_labels(plan.q_order, plan.q_offsets, L)
    lk = token_labels(plan.k_order, plan.k_offsets, L)
    kept = kept_sets(plan)
    B, H = plan.shape
    mask = torch.zeros(B, H, L, L, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            table = torch.zeros(plan.num_q_clusters, plan.num_k_clusters, dtype=torch.bool)
            for c, js in enumerate(kept[b][h]):
                table[c, list(js)] = True
            mask[b, h] = table[lq[b, h].clamp(min=0)][:, lk[b, h].clamp(min=0)]
            mask[b, h] |= (lq[b, h] < 0)[:, None] | (lk[b, h] < 0)[None, :]
    return mask, lq, lk


def oracle_centroid_tail(q, k, v, plan, scale):
    """The dense formula: the kept entries exact, plus per row one term per non-empty key cluster its query
    cluster drops, logit scale * q . mean key + log n, value the mean value (means of the members here)."""
    mask, lq, lk = oracle_mask(plan)
    B, H, L, D = q.shape
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            members = [torch.nonzero(lk[b, h] == j).flatten() for j in range(plan.num_k_clusters)]
            real = [j for j, m in enumerate(members) if len(m)]
            kbar = torch.stack([k[b, h, members[j]].mean(0) for j in real])
            vbar = torch.stack([v[b, h, members[j]].mean(0) for j in real])
            log_n = torch.tensor([math.log(len(members[j])) for j in real])
            exact = (q[b, h] @ k[b, h].T * scale).masked_fill(~mask[b, h], float("-inf"))
            extra = q[b, h] @ kbar.T * scale + log_n
            kept = kept_sets(plan)[b][h]
            dropped = torch.tensor([[lq[b, h, i] >= 0 and j not in kept[lq[b, h, i]] for j in real] for i in range(L)])
            probs = torch.softmax(torch.cat([exact, extra.masked_fill(~dropped, float("-inf"))], -1), -1)
            out[b, h] = probs[:, :L] @ v[b, h] + probs[:, L:] @ vbar
    return out


def true_mass(q, k, mask, scale):
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, -1)
    return float((probs * mask).sum(-1).mean())


# ------------------------------------------------------------------------------ the plan and its execution
@pytest.mark.parametrize("text", DENSE_TEXT)
@pytest.mark.parametrize("budget", [dict(density=0.3), dict(mass=0.7)])
@pytest.mark.parametrize("q_partition", ["kmeans", "kdtree"])
def test_execution_equals_masked_sdpa_and_the_centroid_formula(text, budget, q_partition):
    layout = sv.VideoLayout(3, 5, 7, tile=(2, 4), block_size=16, **text)
    q, k, v = inputs(layout)
    plan = sv.plan(q, k, layout, "clustered", q_clusters=7, k_clusters=9, q_partition=q_partition, **budget)
    assert isinstance(plan, sv.ClusterPlan) and plan.shape == (2, 3)
    mask, _, _ = oracle_mask(plan)
    assert torch.equal(plan.to_mask(), mask)
    assert plan.density == pytest.approx(float(mask.double().mean()), abs=1e-9)
    assert plan.density < 0.95  # something is dropped: the tail below is exercised
    rows = torch.tensor([plan.video_offset, plan.video_offset + 40, plan.video_offset + 104])
    clusters = plan.kept_of_rows(rows, name="three rows")  # what the tail decision reads of its probe rows
    assert plan.kept_of_rows(rows, name="three rows") is clusters
    labels = plan.k_labels()  # with the key clusters, the probe rows' keys (text keys: -1, always kept)
    keys = clusters.gather(-1, labels.clamp(min=0).unsqueeze(2).expand(-1, -1, 3, -1)) | (labels < 0).unsqueeze(2)
    assert torch.equal(keys, mask[:, :, rows])
    _, lq, _ = oracle_mask(plan)
    table = plan.kept_clusters()
    for b, h, p in ((0, 0, 0), (1, 2, 1), (0, 1, 2)):
        assert torch.equal(clusters[b, h, p], table[b, h, lq[b, h, rows[p]]])
    scale = 1 / math.sqrt(16)
    plain = sv.sparse_attention(q, k, v, plan, tail=None)
    torch.testing.assert_close(plain, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=2e-6, rtol=1e-5)
    tailed = sv.sparse_attention(q, k, v, plan, tail=CLUSTER_TAIL.fixed())  # the formula, no decision
    torch.testing.assert_close(tailed, oracle_centroid_tail(q, k, v, plan, scale), atol=2e-6, rtol=1e-5)
    decided = sv.sparse_attention(q, k, v, plan, tail="centroid")
    torch.testing.assert_close(sv.sparse_attention(q, k, v, plan), decided, atol=0, rtol=0)  # "auto" -> centroid
    assert not torch.allclose(tailed, plain, atol=1e-3)
    # per-head and per-batch plans: a slice runs the slice
    torch.testing.assert_close(sv.sparse_attention(q[1:, 2:], k[1:, 2:], v[1:, 2:], plan[1, 2]), tailed[1:, 2:],
                               atol=2e-6, rtol=1e-5)


def test_every_query_keeps_its_own_key_cluster():
    layout = sv.VideoLayout(2, 6, 6, text_tokens=3)
    q, k, _ = inputs(layout, heads=2)
    plan = sv.plan(q, k, layout, "clustered", density=0.05, q_clusters=6, k_clusters=12)
    assert plan.to_mask().diagonal(dim1=-2, dim2=-1).all()
    lq, lk = plan.q_labels(), plan.k_labels()
    kept = kept_sets(plan)
    for b, h, i in zip(*torch.nonzero(lq >= 0).T.tolist()):
        assert lk[b, h, i].item() in kept[b][h][lq[b, h, i]]


def hand_plan(layout, q_lab, k_lab, keep, k):
    """A ClusterPlan from per-video-token labels ``(B, H, V)`` and a bool ``(B, H, Cq, Ck)`` keep table."""
    B, H, V = q_lab.shape
    off = layout.text_tokens if layout.text_first else 0
    cq, ck = keep.shape[-2:]

    def order(lab, c):
        sizes = torch.stack([torch.bincount(lab[b, h], minlength=c) for b in range(B) for h in range(H)]).view(B, H, c)
        return (lab.argsort(dim=-1, stable=True) + off).int(), F.pad(sizes.cumsum(-1), (1, 0)).int(), sizes

    q_order, q_offsets, _ = order(q_lab, cq)
    k_order, k_offsets, k_sizes = order(k_lab, ck)
    sums = torch.zeros(B, H, ck, k.shape[-1]).scatter_add_(2, k_lab[..., None].expand(-1, -1, -1, k.shape[-1]),
                                                           k[:, :, off:off + V])
    means = sums / k_sizes.clamp(min=1)[..., None]
    num = keep.sum(-1).int()
    rows = [torch.nonzero(row).flatten() for row in keep.reshape(-1, ck)]
    ids = torch.stack([F.pad(r, (0, ck - len(r))) for r in rows]).view(B, H, cq, ck).int()
    return sv.ClusterPlan(layout, q_order, q_offsets, k_order, k_offsets, num, ids, means.float())


def test_keys_identical_within_each_cluster_make_the_tail_exact():
    layout = sv.VideoLayout(2, 4, 6, text_tokens=4, text_first=True)
    B, H, V, D, cq, ck = 2, 2, layout.video_tokens, 8, 3, 6
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, layout.num_tokens, D, generator=g) for _ in range(3))
    q_lab = torch.randint(0, cq, (B, H, V), generator=g)
    k_lab = 2 * q_lab + torch.randint(0, 2, (B, H, V), generator=g)  # query cluster c keeps key clusters 2c, 2c + 1
    centres = torch.randn(B, H, ck, D, generator=g)
    k[:, :, 4:] = centres.gather(2, k_lab[..., None].expand(-1, -1, -1, D))  # each key is its cluster's centre
    own = torch.zeros(B, H, cq, ck, dtype=torch.bool)
    own.view(B, H, -1).scatter_(2, q_lab * ck + k_lab, True)
    plan = hand_plan(layout, q_lab, k_lab, own, k)
    assert not plan.to_mask().all()
    dense = F.scaled_dot_product_attention(q, k, v)
    # the call's probe rows see the terms exact: every head keeps them at full weight (log w = 0)
    assert torch.equal(decide_cluster_tail(q, k, v, plan, D ** -0.5), torch.zeros(B, H))
    torch.testing.assert_close(sv.sparse_attention(q, k, v, plan), dense, atol=1e-5, rtol=1e-5)
    assert (sv.sparse_attention(q, k, v, plan, tail=None) - dense).abs().max() > 1e-2


def planted_overshoot(batch=2, heads=2, dim=16, seed=3):
    """q, k, v and a hand plan whose one dropped key cluster's centroid term is worse than dropping it at every
    weight: video queries of cluster 0 point along ``u`` (``q = √D u``, scale ``1/√D``) and keep key cluster 0
    (values ``c``); key cluster 1, which they drop, has one key ``u`` (value ``c + d``) and 15 keys ``-u`` (value
    ``c - x d``, ``x = e^2 / 15``), so its exact share of the output is ``c``: dropping it is (nearly) exact,
    while its term adds mass with the mean value ``c - 0.4 d`` (the term's mass stays under the cluster's,
    Jensen; its mean value misstates the attention-weighted one). Queries of cluster 1 keep both key clusters."""
    layout = sv.VideoLayout(2, 4, 4, text_tokens=3, text_first=False)
    V, D = layout.video_tokens, dim
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(batch, heads, 1, D, generator=g), dim=-1)
    c, d = torch.randn(batch, heads, 1, D, generator=g), torch.randn(batch, heads, 1, D, generator=g)
    q = math.sqrt(D) * u + 0.01 * torch.randn(batch, heads, layout.num_tokens, D, generator=g)  # q.k scale = ±1
    k = 0.3 * torch.randn(batch, heads, layout.num_tokens, D, generator=g)
    v = c.expand(batch, heads, layout.num_tokens, D).clone()
    k[:, :, 16:17], v[:, :, 16:17] = u, c + d
    k[:, :, 17:V], v[:, :, 17:V] = -u, c - math.exp(2) / 15 * d
    labels = (torch.arange(V) >= 16).long().expand(batch, heads, V)
    keep = torch.tensor([[True, False], [True, True]]).expand(batch, heads, 2, 2)
    return q, k, v, hand_plan(layout, labels, labels, keep, k)


def test_planted_overshoot_falls_back_to_dropping():
    q, k, v, plan = planted_overshoot()
    B, H, _, D = q.shape
    gate = decide_cluster_tail(q, k, v, plan, D ** -0.5)
    assert torch.equal(gate, torch.full((B, H), float("-inf")))
    dropped = sv.sparse_attention(q, k, v, plan, tail=None)
    formula = sv.sparse_attention(q, k, v, plan, tail=CLUSTER_TAIL.fixed())
    exact = F.scaled_dot_product_attention(q, k, v)
    assert (formula - exact).norm() > 10 * (dropped - exact).norm()  # the term is planted worse than dropping
    torch.testing.assert_close(sv.sparse_attention(q, k, v, plan, tail="centroid"), dropped, atol=1e-3, rtol=0)
    torch.testing.assert_close(sv.sparse_attention(q, k, v, plan), dropped, atol=1e-3, rtol=0)  # "auto"


def test_validate_names_each_broken_invariant():
    layout = sv.VideoLayout(2, 4, 4, text_tokens=2)
    q, k, _ = inputs(layout, batch=1, heads=1, dim=8)
    good = sv.plan(q, k, layout, "clustered", q_clusters=4, k_clusters=4, density=0.3)
    fields = {name: getattr(good, name) for name in sv.ClusterPlan._FIELDS}

    def broken(**changes):
        return sv.ClusterPlan(layout, **{**fields, **changes})

    sv.ClusterPlan(layout, **fields).validate()
    order = fields["q_order"].clone()
    order[..., 0] = order[..., 1]
    with pytest.raises(ValueError, match="q_order to be a permutation"):
        broken(q_order=order).validate()
    offsets = fields["k_offsets"].clone()
    offsets[..., 1] = 99
    with pytest.raises(ValueError, match="k_offsets to run from 0"):
        broken(k_offsets=offsets).validate()
    ids = fields["kv_clusters"].clone()
    ids[..., 0] = 7
    with pytest.raises(ValueError, match="kv_clusters in"):
        broken(kv_clusters=ids).validate()
    with pytest.raises(ValueError, match="strictly ascending"):
        broken(kv_clusters=fields["kv_clusters"].flip(-1).contiguous(),
               kv_num_clusters=torch.full_like(fields["kv_num_clusters"], 4)).validate()
    only_first = torch.zeros_like(fields["kv_clusters"])
    with pytest.raises(ValueError, match="own token"):
        broken(kv_clusters=only_first, kv_num_clusters=torch.ones_like(fields["kv_num_clusters"])).validate()
    with pytest.raises(ValueError, match="k_means of shape"):
        broken(k_means=fields["k_means"][:, :, :3])
    with pytest.raises(TypeError, match="q_offsets to be a torch.int32"):
        broken(q_offsets=fields["q_offsets"].long())
    # a hand-built plan is validated before its first launch
    with pytest.raises(ValueError, match="own token"):
        sv.sparse_attention(q, k, k, broken(kv_clusters=only_first,
                                            kv_num_clusters=torch.ones_like(fields["kv_num_clusters"])))


def test_printing_slicing_moving():
    layout = sv.VideoLayout(2, 4, 4, text_tokens=2)
    q, k, _ = inputs(layout, batch=2, heads=3, dim=8)
    plan = sv.plan(q, k, layout, "clustered", q_clusters=4, k_clusters=5, density=0.3)
    text = str(plan)
    assert "ClusterPlan(method='clustered'" in text and "q_clusters=4" in text and "k_clusters=5" in text
    assert "batch 0, head 0: density" in text and "... 2 more" in text
    part = plan[-1, 1:]
    assert part.shape == (1, 2) and torch.equal(part.to_mask(), plan.to_mask()[1:, 1:])
    assert part.centroids[1].shape == (1, 2, 5, 8)
    assert torch.equal(plan.to("cpu").to_mask(), plan.to_mask())
    with pytest.raises(IndexError, match="batch index"):
        plan[2]


# ------------------------------------------------------------------------------ what the clusters find
def planted(groups=8, frames=4, side=16, dim=32, seed=0):
    """Queries of group i attend to the keys of group i only; each group's tokens are scattered over the
    frames (a random assignment), so no spatial tile holds one group."""
    layout = sv.VideoLayout(frames, side, side, block_size=64)
    g = torch.Generator().manual_seed(seed)
    L = layout.num_tokens
    group = torch.randperm(L, generator=g) % groups
    direction = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:groups] * 6.0
    base = direction[group]
    q = (base + 0.3 * torch.randn(L, dim, generator=g)).view(1, 1, L, dim)
    k = (base + 0.3 * torch.randn(L, dim, generator=g)).view(1, 1, L, dim)
    return layout, q, k, 1 / groups


def test_planted_clusters_keep_the_mass_tiles_cannot():
    layout, q, k, density = planted()
    scale = 1 / math.sqrt(q.shape[-1])
    plan = sv.plan(q, k, layout, "clustered", density=density)
    draft = sv.plan(q, k, layout, "draft", density=density)
    assert plan.density <= 1.25 * density
    assert true_mass(q, k, plan.to_mask(), scale) >= 0.95
    assert true_mass(q, k, draft.to_mask(), scale) < 0.4


@pytest.fixture(scope="module")
def testbed_steps():
    """q/k of every self-attention layer of the small testbed (4 x 8 x 8 tokens) at two consecutive denoising
    steps of one generation (stopped after the second)."""
    from sparsevid import testbed
    from sparsevid.lab.eval import LayerCapture

    class Done(Exception):
        pass

    tb = testbed.load_pipeline(device="cpu")
    captures = [LayerCapture(tb.transformer, step) for step in (2, 3)]

    def stop(*_):
        if captures[1].layers:
            raise Done

    hook = tb.transformer.register_forward_hook(stop)
    try:
        tb(label=tb.labels[0], seed=0, steps=6, frames=4, height=32, width=32, progress=False)
    except Done:
        pass
    finally:
        hook.remove()
        for c in captures:
            c.remove()
    layout = sv.VideoLayout(*captures[0].grid)
    return layout, [(a[:2], b[:2]) for a, b in zip(captures[0].layers, captures[1].layers)]


def objective(x, order, offsets):
    """Summed squared distance of each video row to its cluster's member mean (clusters from the plan's order)."""
    total = 0.0
    B, H, _ = order.shape
    for b in range(B):
        for h in range(H):
            for c in range(offsets.shape[-1] - 1):
                rows = x[b, h, order[b, h, offsets[b, h, c]:offsets[b, h, c + 1]].long()].double()
                if len(rows):
                    total += float((rows - rows.mean(0)).square().sum())
    return total


def test_warm_start_on_the_next_step_converges_in_two_iterations(testbed_steps):
    layout, layers = testbed_steps
    for (q0, k0), (q1, k1) in layers:
        assert not torch.equal(q0, q1)
        before = sv.plan(q0, k0, layout, "clustered", density=0.1)
        cold = sv.plan(q1, k1, layout, "clustered", density=0.1)
        warm = sv.plan(q1, k1, layout, "clustered", density=0.1, centroids=before.centroids, iters=2)
        for x, side in ((q1, "q"), (k1, "k")):
            j_cold = objective(x, getattr(cold, f"{side}_order"), getattr(cold, f"{side}_offsets"))
            j_warm = objective(x, getattr(warm, f"{side}_order"), getattr(warm, f"{side}_offsets"))
            assert j_warm <= 1.01 * j_cold, (side, j_warm, j_cold)


# ------------------------------------------------------------------------------ options
def test_kdtree_query_clusters_are_equal_and_split_planted_groups():
    """``q_partition="kdtree"``: every query cluster holds floor or ceil(V / Cq) rows (105 / 8: 13 or 14) and says so
    (``max_q_size``); four planted groups of queries far apart (the corners of a square in two channels, among 14
    channels of noise) come out as four clusters (each cluster one group) however the tokens are ordered; keys stay
    k-means (variable sizes)."""
    layout = sv.VideoLayout(3, 5, 7)
    V = layout.video_tokens
    q, k, _ = inputs(layout)
    plan = sv.plan(q, k, layout, "clustered", q_clusters=8, k_clusters=9, q_partition="kdtree").validate()
    assert set(plan.q_sizes.unique().tolist()) == {13, 14} and plan.max_q_size == 14
    assert plan.q_labels().shape == (2, 3, V) and plan.centroids[0].shape == (2, 3, 8, 16)
    g = torch.Generator().manual_seed(5)
    V = 4 * 28
    layout = sv.VideoLayout(4, 4, 7)
    group = torch.randperm(V, generator=g) % 4  # 28 tokens a group, scattered over the video
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    directions = 10 * corners @ torch.eye(16)[[3, 12]]  # channels 3 and 12: one split each
    q = (directions[group] + 0.3 * torch.randn(V, 16, generator=g)).expand(1, 2, V, 16).contiguous()
    plan = sv.plan(q, q, layout, "clustered", q_clusters=4, k_clusters=4, q_partition="kdtree")
    labels = plan.q_labels()
    for h in range(2):
        pairs = set(zip(labels[0, h].tolist(), group.tolist()))
        assert len(pairs) == 4 and len({c for c, _ in pairs}) == 4
    with pytest.raises(ValueError, match="max_q_size=13"):  # a plan claiming a bound its clusters break
        sv.ClusterPlan(layout, plan.q_order, plan.q_offsets, plan.k_order, plan.k_offsets, plan.kv_num_clusters,
                       plan.kv_clusters, plan.k_means, max_q_size=13).validate()


def test_bad_options_are_refused_naming_them():
    layout = sv.VideoLayout(2, 4, 4)
    q, k, _ = inputs(layout, batch=1, heads=2, dim=8)
    for name in ("q_clusters", "k_clusters", "iters"):
        for bad in (0, -3, 1.5, True, "8"):
            with pytest.raises(ValueError, match=name):
                sv.plan(q, k, layout, "clustered", **{name: bad})
    for budget in (dict(density=0.0), dict(density=1.5), dict(mass=2.0), dict(mass=-0.1)):
        with pytest.raises(ValueError, match=next(iter(budget))):
            sv.plan(q, k, layout, "clustered", **budget)
    with pytest.raises(TokenCountError, match="k_clusters <= 32"):
        sv.plan(q, k, layout, "clustered", k_clusters=33)
    plan = sv.plan(q, k, layout, "clustered", q_clusters=4, k_clusters=6)
    qc, kc = plan.centroids
    with pytest.raises(ValueError, match="q_centroids of shape"):
        sv.plan(q, k, layout, "clustered", q_clusters=5, k_clusters=6, centroids=plan.centroids)
    with pytest.raises(ValueError, match="k_centroids of shape"):
        sv.plan(q, k, layout, "clustered", q_clusters=4, k_clusters=6, centroids=(qc, kc[:, :1]))
    with pytest.raises(TypeError, match="centroids to be a"):
        sv.plan(q, k, layout, "clustered", q_clusters=4, k_clusters=6, centroids=qc)
    with pytest.raises(ValueError, match="seed"):
        sv.plan(q, k, layout, "clustered", seed=-1)
    with pytest.raises(ValueError, match="q_partition"):
        sv.plan(q, k, layout, "clustered", q_partition="balanced")
    with pytest.raises(ValueError, match="max_q_size"):
        sv.ClusterPlan(layout, plan.q_order, plan.q_offsets, plan.k_order, plan.k_offsets, plan.kv_num_clusters,
                       plan.kv_clusters, plan.k_means, max_q_size=0)


def test_tails_and_plan_types():
    layout = sv.VideoLayout(2, 4, 4, text_tokens=2, block_size=16, tile=(4, 4))
    q, k, v = inputs(layout, batch=1, heads=2, dim=8)
    clusters = sv.plan(q, k, layout, "clustered", q_clusters=4, k_clusters=4, density=0.3)
    blocks = sv.plan(q, k, layout, "draft", density=0.3)
    with pytest.raises(ValueError, match="ClusterPlan with tail='centroid'"):
        sv.sparse_attention(q, k, v, blocks, tail="centroid")
    with pytest.raises(ValueError, match="pooled-var"):
        sv.sparse_attention(q, k, v, clusters, tail="pooled-var")
    with pytest.raises(ValueError, match="'auto', 'centroid'"):
        sv.sparse_attention(q, k, v, clusters, tail="centroids")
    assert torch.equal(sv.sparse_attention(q, k, v, blocks), sv.sparse_attention(q, k, v, blocks, tail=None))
    with pytest.raises(TypeError, match="for backend 'flex'"):
        sv.sparse_attention(q, k, v, clusters, backend="flex")


# ------------------------------------------------------------------------------ the integration
@pytest.mark.filterwarnings("ignore:sparsevid. density")  # tiny grids: the own clusters alone are most entries
def test_the_session_warm_starts_per_layer_and_branch_and_remove_drops_the_centroids(monkeypatch):
    pytest.importorskip("diffusers")
    from tiny_models import tiny_wan, tiny_wan_pipeline, wan_inputs

    from sparsevid.integrations import core

    made = []
    real = core.make_plan

    def spy(*args, **kwargs):
        plan = real(*args, **kwargs)
        made.append((kwargs.get("centroids"), plan.centroids))
        return plan

    monkeypatch.setattr(core, "make_plan", spy)
    pipe = tiny_wan_pipeline()
    handle = sv.apply(pipe, method="clustered", density=0.3, dense_layers=0, dense_steps=0, replan_every=1,
                      tile=(2, 4), block_size=16)  # every step plans (clustered's default reuses plans for 4 steps)
    made.clear()  # apply's own check on a tiny input
    pipe(prompt="a bunny", negative_prompt="sky", height=48, width=80, num_frames=5, num_inference_steps=3,
         max_sequence_length=16, output_type="latent")
    # per step: 2 layers x (cond, uncond); each plan after the first step starts from the one 4 plans before
    assert len(made) == 12
    assert all(passed is None for passed, _ in made[:4])
    assert all(made[i][0] is made[i - 4][1] for i in range(4, 12))
    handle.remove()

    model = tiny_wan()
    handle = sv.apply(model, method="clustered", density=0.3, dense_layers=0, dense_steps=0, tile=(2, 4), block_size=16)
    with torch.no_grad():
        model(**wan_inputs())
    session = handle.sessions[0]
    assert len(session._centroids) == 2
    handle.remove()
    assert not session._centroids


def test_apply_refuses_what_no_layout_takes_and_defers_what_tokens_decide():
    pytest.importorskip("diffusers")
    from tiny_models import tiny_wan

    for bad in (dict(q_clusters=0), dict(k_clusters=2.5), dict(iters=0), dict(density=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sv.apply(tiny_wan(), method="clustered", **bad)
    with pytest.raises(ValueError, match="centroids"):
        sv.apply(tiny_wan(), method="clustered", centroids=None)
    sv.apply(tiny_wan(), method="clustered", q_clusters=4096, k_clusters=4096).remove()  # more than apply's probe


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-kmeans' assignment kernel runs on CUDA only")
def test_the_flash_kmeans_engine_agrees_with_the_torch_one():
    """The two assignment engines of ``kmeans`` (flash-kmeans' Triton kernel where installed, the chunked float32
    matmul) on bf16 keys from one start: the same clusters up to near ties, the same means."""
    pytest.importorskip("flash_kmeans")
    from sparsevid.planners import clustered as module

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 3, 16, 64, generator=g) * 3
    x = (centres[:, :, torch.randint(0, 16, (4096,), generator=g)] + torch.randn(2, 3, 4096, 64, generator=g))
    x, init = x.to("cuda", torch.bfloat16), centres.cuda()
    assert module._flash_kmeans() is not None
    flash = module.kmeans(x, init, 3)
    saved = module._flash_kmeans
    module._flash_kmeans = lambda: None
    try:
        plain = module.kmeans(x, init, 3)
    finally:
        module._flash_kmeans = saved
    assert (flash[0] == plain[0]).float().mean() > 0.99
    torch.testing.assert_close(flash[2], plain[2], atol=0.05, rtol=0.02)
