"""Every planner, on random layouts: the plan is valid, reaches its density, and executes exactly
like dense SDPA with the plan's token mask (the independent oracle)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import layouts

import sparsevid as sv
from sparsevid.planners._select import forced_blocks

# clustered: tests/test_clustered.py (no blocks: its forced entries are its own key clusters, not these bounds)
SPARSE = [m for m in sv.available_planners() if m not in ("dense", "clustered")]


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def density_bounds(layout, density):
    """Achieved density may miss by one key block per query block, or exceed where forced blocks do."""
    tokens = layout.block_tokens.double()
    L = layout.num_tokens
    forced_row = (forced_blocks(layout, "cpu").double() * tokens[None, :]).sum(1) * tokens
    upper_rows = torch.maximum(density * tokens * L, forced_row).sum() / L**2
    tol = layout.block_size / L
    return density - tol, float(upper_rows) + tol


@settings(max_examples=40, deadline=None)
@given(
    layout=layouts(),
    method=st.sampled_from(SPARSE),
    density=st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0]),
    batch=st.integers(1, 2),
    heads=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_plan_executes_like_masked_sdpa(layout, method, density, batch, heads, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, layout.num_tokens, 16, generator=g) for _ in range(3))
    plan = sv.plan(q, k, layout, method=method, density=density)
    plan.validate()
    lo, hi = density_bounds(layout, density)
    assert lo - 1e-9 <= plan.density <= hi + 1e-9, (plan.density, lo, hi)
    out = sv.sparse_attention(q, k, v, plan)
    mask = plan.to_mask().expand(batch, heads, -1, -1)
    # the density from the counts is the computed fraction of the real L x L entries
    assert torch.allclose(plan.density_per_head().expand(batch, heads), mask.double().mean((-2, -1)))
    oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert rel_err(out, oracle) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_and_strides(dtype):
    layout = sv.VideoLayout(frames=2, height=6, width=10, text_tokens=7, tile=(4, 4), block_size=16)
    B, H, L, D = 2, 3, layout.num_tokens, 32
    # (B, L, H, D) storage read as (B, H, L, D): non-contiguous on purpose
    q, k, v = (torch.randn(B, L, H, D).to(dtype).transpose(1, 2) for _ in range(3))
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    out = sv.sparse_attention(q, k, v, plan)
    assert out.dtype == dtype and out.shape == (B, H, L, D)
    oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=plan.to_mask())
    assert rel_err(out, oracle) < 1e-2


def test_dense_equals_plain_sdpa():
    layout = sv.VideoLayout(frames=3, height=5, width=7, text_tokens=11, text_first=True, tile=(2, 4), block_size=16)
    q, k, v = (torch.randn(2, 2, layout.num_tokens, 16) for _ in range(3))
    for plan in (sv.plan(q, k, layout, method="dense"), sv.plan(q, k, layout, method="random", density=1.0)):
        assert plan.density == pytest.approx(1.0)
        out = sv.sparse_attention(q, k, v, plan)
        assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_backend_matches_reference():
    layout = sv.VideoLayout(frames=2, height=5, width=7, text_tokens=9, tile=(4, 4), block_size=16)
    q, k, v = (torch.randn(2, 2, layout.num_tokens, 16) for _ in range(3))
    for method in ("draft", "window"):  # per-head and broadcast (1, 1) plans
        plan = sv.plan(q, k, layout, method=method, density=0.3)
        flex = sv.sparse_attention(q, k, v, plan, backend="flex")
        assert rel_err(flex, sv.sparse_attention(q, k, v, plan, backend="reference")) < 1e-5


def test_mass_budget_and_head_vs_row_budget():
    layout = sv.VideoLayout(frames=2, height=8, width=8, tile=(4, 4), block_size=16)
    q, k = (torch.randn(1, 2, layout.num_tokens, 16) for _ in range(2))
    low, high = (sv.plan(q, k, layout, method="draft", mass=m).density for m in (0.3, 0.9))
    assert low < high
    row = sv.plan(q, k, layout, method="draft", density=0.25, budget="row")
    counts = row.kv_num_blocks.float()
    head = sv.plan(q, k, layout, method="draft", density=0.25, budget="head")
    assert counts.std() <= head.kv_num_blocks.float().std()  # the row budget keeps rows even


def test_layer_budget_moves_blocks_from_peaked_to_diffuse_heads():
    layout = sv.VideoLayout(frames=2, height=8, width=16, tile=(4, 4), block_size=16)
    L = layout.num_tokens
    g = torch.Generator().manual_seed(0)
    block = layout.on("cpu").block_of_token
    direction = torch.randn(layout.num_blocks, 16, generator=g)[block]  # one direction per tile
    k = (direction + 0.1 * torch.randn(L, 16, generator=g)).expand(1, 2, L, 16).contiguous()
    q = torch.zeros(1, 2, L, 16)
    q[:, 0] = 2.0 * direction  # head 0: each tile attends to itself; head 1: uniform attention
    head = sv.plan(q, k, layout, method="draft", density=0.25, budget="head")
    layer = sv.plan(q, k, layout, method="draft", density=0.25, budget="layer")
    per_head, per_layer = head.density_per_head()[0], layer.density_per_head()[0]
    assert abs(per_head[0] - per_head[1]) < 0.05  # each head spends its own budget
    assert per_layer[1] > per_head[1] + 0.1 and per_layer[0] < per_head[0] - 0.1  # peaked head gives to diffuse
    assert layer.density == pytest.approx(0.25, abs=0.05)  # the layer as a whole keeps the density
    v = torch.randn(1, 2, L, 16)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=layer.to_mask())
    assert rel_err(sv.sparse_attention(q, k, v, layer, backend="reference"), ref) < 1e-5


def test_window_radius_is_a_static_neighbourhood():
    layout = sv.VideoLayout(frames=4, height=8, width=8, tile=(4, 4), block_size=16)
    q = torch.randn(1, 1, layout.num_tokens, 8)
    plan = sv.plan(q, q, layout, method="window", radius=(1, 0, 0))
    assert plan.shape == (1, 1)
    dense = plan.to_dense()[0, 0]
    tiles = layout.block_centers / torch.tensor([1.0, 4.0, 4.0])  # blocks are whole 4x4 tiles here
    expected = ((tiles[:, None] - tiles[None]).abs() <= torch.tensor([1, 0, 0])).all(-1)
    assert torch.equal(dense, expected)


def test_random_plan_is_seeded():
    layout = sv.VideoLayout(frames=2, height=8, width=8, tile=(4, 4), block_size=16)
    q = torch.randn(1, 2, layout.num_tokens, 8)
    a, b, c = (sv.plan(q, q, layout, method="random", density=0.3, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.to_dense(), b.to_dense()) and not torch.equal(a.to_dense(), c.to_dense())


def test_planners_never_build_the_full_score_matrix(monkeypatch):
    """Planner matmuls stay far below L x L per head (the draft map is NB x NB)."""
    layout = sv.VideoLayout(frames=4, height=16, width=16, tile=(4, 4), block_size=16)
    L = layout.num_tokens
    q = torch.randn(1, 1, L, 8)
    biggest = []
    real_matmul = torch.matmul

    def spy(a, b, *args, **kwargs):
        out = real_matmul(a, b, *args, **kwargs)
        biggest.append(out.shape[-1] * out.shape[-2])
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    for method in ("draft", "xattn"):
        biggest.clear()
        sv.plan(q, q, layout, method=method, density=0.2)
        assert biggest and max(biggest) <= L * L / 8, (method, max(biggest), L * L)


def test_plan_repr_string_slicing_and_to():
    layout = sv.VideoLayout(frames=2, height=8, width=8, tile=(4, 4), block_size=16)
    q = torch.randn(2, 3, layout.num_tokens, 8)
    plan = sv.plan(q, q, layout, method="draft", density=0.3)
    assert "density=" in repr(plan) and "draft" in repr(plan)
    text = plan.to_string()
    assert "batch 0, head 0" in text and "more (batch, head)" in text
    sub = plan[1, 2]
    assert sub.shape == (1, 1)
    assert torch.equal(sub.to_dense()[0, 0], plan.to_dense()[1, 2])
    assert plan.to("cpu").density == pytest.approx(plan.density)
    assert math.isclose(float(plan.density_per_head().mean()), plan.density)


def test_block_size_override_retiles():
    layout = sv.VideoLayout(frames=2, height=8, width=16)  # auto tile (8, 16) for 128-token blocks
    q, k, v = torch.randn(3, 1, 2, layout.num_tokens, 32).unbind(0)
    plan = sv.plan(q, k, layout, method="draft", density=0.5, block_size=32)
    assert plan.layout.block_size == 32 and math.prod(plan.layout.tile) <= 32
    mask = plan.to_mask()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(sv.sparse_attention(q, k, v, plan, backend="reference"), ref, atol=1e-5)
    with pytest.raises(ValueError, match="tile"):
        sv.plan(q, k, layout, method="draft", density=0.5, tile=(8, 16), block_size=32)


@pytest.mark.parametrize("kw,exc,fragment", [
    (dict(method="random", seed=1.5), TypeError, "seed"),
    (dict(method="random", seed=2**70), ValueError, r"seed to be an int in \[0, 2\*\*63\)"),
    (dict(method="random", seed=-1), ValueError, "seed"),
    (dict(method="window", frame_weight="x"), TypeError, "frame_weight"),
    (dict(method="window", frame_weight=float("nan")), ValueError, "frame_weight"),
    (dict(method="window", frame_weight=-1.0), ValueError, "frame_weight"),
], ids=["seed float", "seed 2**70", "seed negative", "frame_weight str", "frame_weight nan", "frame_weight negative"])
def test_planner_options_are_checked_when_planning(kw, exc, fragment):
    """Defect (issue 23): torch's own errors (or, for frame_weight=nan, density 0.25 for 0.5 asked)."""
    layout = sv.VideoLayout(2, 4, 8, tile=(4, 4), block_size=16)
    q = torch.randn(1, 2, layout.num_tokens, 16)
    with pytest.raises(exc, match=fragment):
        sv.plan(q, q, layout, density=0.5, **kw)


def test_finegrained_mass_one_keeps_every_token():
    """Defect (issue 23): 298 of 300 cases kept less than everything (the estimate's tail underflows to 0)."""
    layout = sv.VideoLayout(3, 4, 8, tile=(2, 4), block_size=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.num_tokens, 16, generator=g) * 3 for _ in range(3))
    plan = sv.plan(q, k, layout, method="finegrained", mass=1.0)
    assert plan.density == 1.0
    torch.testing.assert_close(sv.sparse_attention(q, k, v, plan), F.scaled_dot_product_attention(q, k, v))


def test_finegrained_keeps_the_own_block_with_nan_inputs():
    """Defect (issue 23): with validate=False, NaN in q ranked before the forced tokens and dropped them."""
    layout = sv.VideoLayout(2, 4, 8, tile=(4, 4), block_size=16)
    q = torch.randn(1, 2, layout.num_tokens, 16)
    q[0, 0, 5] = float("nan")
    for budget in ("row", "head"):
        sv.plan(q, q, layout, method="finegrained", density=0.3, budget=budget, validate=False).validate()
    sv.plan(q, q, layout, method="finegrained", mass=0.5, validate=False).validate()
