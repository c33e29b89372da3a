"""Planted structure: each query tile's attention mass sits, by construction, on a known set of key
tiles that are neither local nor diagonal. Content planners must find them; random cannot."""

import pytest
import torch
import torch.nn.functional as F

import sparsevid as sv

TARGETS = 3


def planted_inputs(seed=0, heads=2, dim=64):
    layout = sv.VideoLayout(frames=4, height=8, width=16, tile=(4, 4), block_size=16)  # 32 blocks
    nb, L = layout.num_blocks, layout.num_tokens
    g = torch.Generator().manual_seed(seed)
    codes = torch.nn.functional.normalize(torch.randn(heads, nb, dim, generator=g), dim=-1)
    tiles = layout.block_centers / torch.tensor([1.0, 4.0, 4.0])  # every block is one whole 4x4 tile
    near = ((tiles[:, None] - tiles[None]).abs() <= 1).all(-1)  # own tile and its neighbours
    targets = torch.zeros(heads, nb, nb, dtype=torch.bool)
    for h in range(heads):
        for m in range(nb):
            far = torch.nonzero(~near[m]).squeeze(1)
            targets[h, m, far[torch.randperm(len(far), generator=g)[:TARGETS]]] = True
    block_of_token = layout.inverse_perm // layout.block_size
    k = codes[:, block_of_token] * 8 + 0.3 * torch.randn(heads, L, dim, generator=g)
    q = (targets.float() @ codes)[:, block_of_token] * 8 + 0.3 * torch.randn(heads, L, dim, generator=g)
    v = torch.randn(heads, L, dim, generator=g)
    return layout, q[None], k[None], v[None], targets


@pytest.mark.parametrize("method", ["draft", "xattn"])
def test_content_planners_recover_planted_tiles(method):
    layout, q, k, v, targets = planted_inputs()
    density = (TARGETS + 1) / layout.num_blocks
    plan = sv.plan(q, k, layout, method=method, density=density)
    recovered = (plan.to_dense()[0] & targets).sum() / targets.sum()
    assert recovered >= 0.95, f"{method} recovered {float(recovered):.0%} of the planted tiles"

    dense = F.scaled_dot_product_attention(q, k, v)

    def err(p):
        out = sv.sparse_attention(q, k, v, p)
        return float((out - dense).norm() / dense.norm())

    baseline = err(sv.plan(q, k, layout, method="random", density=density))
    assert err(plan) <= 0.1 * baseline, (err(plan), baseline)


def test_planted_structure_is_not_local():
    """The window planner, blind to content, must fail here, or the test would prove nothing."""
    layout, q, k, v, targets = planted_inputs()
    plan = sv.plan(q, k, layout, method="window", density=(TARGETS + 1) / layout.num_blocks)
    recovered = (plan.to_dense()[0] & targets).sum() / targets.sum()
    assert recovered < 0.2
