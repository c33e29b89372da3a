"""Ring attention with block plans (simulated: ranks as chunks in one process) and Ulysses head balance.

Oracles: ``sparse_attention`` on the whole sequence (the one-GPU output), and the token-level mask
``plan.to_mask()`` for which ring steps hold a kept entry.
"""

import pytest
import torch

import sparsevid as sv
from sparsevid.parallel.head_balance import HeadBalance, balanced_order, imbalance, separable
from sparsevid.kernels.reference import sparse_attention_reference
from sparsevid.parallel.ring import chunk_tables, merge_partials, needed_steps, simulate_ring
from sparsevid.tail import TAIL_METHODS

LAYOUTS = [
    sv.VideoLayout(4, 6, 8, tile=(2, 4), block_size=16),  # chunk boundaries inside frames for R = 3
    sv.VideoLayout(3, 5, 7, tile=(2, 3), block_size=16),  # ragged tiles, a short last block
    sv.VideoLayout(2, 4, 6, text_tokens=12, text_first=True, block_size=16),  # text blocks, dense both ways
]
PLANS = {
    "draft": dict(method="draft", density=0.3),
    "draft-mass": dict(method="draft", mass=0.7),
    "xattn": dict(method="xattn", density=0.3, stride=4),
    "window": dict(method="window", radius=(1, 1, 1)),  # broadcast (1, 1) plan; skips far chunks
    "dense": dict(method="dense"),
}


def _inputs(layout, B=2, H=3, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, layout.num_tokens, D, generator=g) for _ in range(3))


def _chunkings(layout):
    return [r for r in (1, 2, 3, 4) if layout.num_tokens % r == 0]


# The summaries taken as they are: with the call's decision a rank decides from its own rows (test_tail.py)
FIXED = TAIL_METHODS["pooled-var"].fixed()


@pytest.mark.parametrize("tail", [None, FIXED], ids=["none", "pooled-var"])
@pytest.mark.parametrize("name", sorted(PLANS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_simulated_ring_equals_one_process_output(layout, name, tail):
    q, k, v = _inputs(layout)
    plan = sv.plan(q, k, layout, **PLANS[name])
    single = sv.sparse_attention(q, k, v, plan, tail=tail, backend="reference")
    for chunks in _chunkings(layout):
        out, _ = simulate_ring(q, k, v, plan, chunks, tail=tail)
        torch.testing.assert_close(out, single, atol=5e-5, rtol=1e-4)


def test_simulated_ring_with_sub_block_summaries():
    layout = sv.VideoLayout(4, 6, 8, tile=(4, 8), block_size=64)  # pooled-var-32: two summaries per block
    q, k, v = _inputs(layout)
    plan = sv.plan(q, k, layout, method="draft", density=0.4)
    fixed = TAIL_METHODS["pooled-var-32"].fixed()
    single = sv.sparse_attention(q, k, v, plan, tail=fixed, backend="reference")
    for chunks in (2, 3):
        torch.testing.assert_close(simulate_ring(q, k, v, plan, chunks, tail=fixed)[0], single,
                                   atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(PLANS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_skipped_steps_are_exactly_those_without_a_kept_entry(layout, name):
    q, k, v = _inputs(layout)
    plan = sv.plan(q, k, layout, **PLANS[name])
    mask = plan.to_mask().expand(2, 3, -1, -1)  # (B, H, L, L), original token order
    skipped_somewhere = False
    for chunks in _chunkings(layout):
        size = layout.num_tokens // chunks
        expected = torch.tensor([[bool(mask[:, :, r * size:(r + 1) * size, j * size:(j + 1) * size].any())
                                  for j in range(chunks)] for r in range(chunks)])
        _, ran = simulate_ring(q, k, v, plan, chunks)
        assert torch.equal(ran, expected)
        assert torch.equal(needed_steps(plan, chunks), expected)
        assert bool(ran.diagonal().all())  # the own chunk's step always runs
        skipped_somewhere |= not bool(ran.all())
    if name == "window" and layout is LAYOUTS[0]:
        assert skipped_somewhere  # a temporal window leaves far chunks out (blocks within frames here)


def test_a_step_plan_covers_every_kept_entry_once():
    layout = LAYOUTS[0]
    q, k, _ = _inputs(layout)
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    chunks, size = 3, layout.num_tokens // 3
    tables = chunk_tables(layout, chunks, "cpu")
    # every token of the sequence is a real slot of exactly one chunk
    owned = torch.cat([t.slots[t.slots >= 0] + c * size for c, t in enumerate(tables)])
    assert torch.equal(owned.sort().values, torch.arange(layout.num_tokens))
    # a chunk's blocks are exactly the blocks that hold one of its tokens
    block_of_token = layout.on("cpu").block_of_token
    for c, t in enumerate(tables):
        assert torch.equal(t.blocks, block_of_token[c * size:(c + 1) * size].unique())


def test_reference_lse_is_the_log_sum_exp_of_the_computed_entries():
    layout = LAYOUTS[1]
    q, k, v = _inputs(layout)
    plan = sv.plan(q, k, layout, method="draft", density=0.4)
    scale = 0.25
    out, lse = sparse_attention_reference(q, k, v, plan.perm, plan.kv_num_blocks, plan.kv_indices, plan.block_size,
                                          scale, return_lse=True)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~plan.to_mask(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v)
    assert out.dtype == torch.float32


def test_merge_of_partials_over_disjoint_keys_is_the_whole_softmax():
    g = torch.Generator().manual_seed(0)
    scores, values = torch.randn(2, 5, 12, generator=g), torch.randn(2, 12, 4, generator=g)
    scores[1, 2] = float("-inf")  # a row with nothing computed in either part

    def partial(columns):
        s = scores[..., columns]
        lse = torch.logsumexp(s, -1)
        probs = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0).unsqueeze(-1))
        return probs @ values[:, columns], lse

    out, lse = merge_partials(*partial(slice(0, 7)), *partial(slice(7, 12)))
    whole, whole_lse = partial(slice(0, 12))
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(lse, whole_lse)
    assert lse[1, 2] == float("-inf") and bool((out[1, 2] == 0).all())


def test_simulated_ring_refuses_chunks_that_do_not_divide_the_sequence():
    layout = LAYOUTS[0]
    q, k, v = _inputs(layout)
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    with pytest.raises(ValueError, match="dividing the 192 tokens"):
        simulate_ring(q, k, v, plan, 5)
    token_plan = sv.plan(q, k, layout, method="finegrained", density=0.3)
    with pytest.raises(TypeError, match="NYI: token plans"):
        simulate_ring(q, k, v, token_plan, 2)


# ---------------------------------------------------------------------------------------------- the Triton step
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # on the CPU the Triton interpreter (tests/conftest.py)


def _triton():
    return pytest.importorskip("triton")


def test_triton_step_kernel_equals_its_reference_twin():
    """A ring step: query and key chunks with their own tables (blocks cut by the chunk boundary), a row
    block with nothing to compute (zeros, -inf), and the log-sum-exp out; float32 under the interpreter."""
    _triton()
    from sparsevid.kernels.triton_blocksparse import sparse_attention_triton
    from sparsevid.parallel.ring import ring_steps

    layout = LAYOUTS[0]
    q, k, v = (t.to(DEVICE) for t in _inputs(layout, B=1, H=2, D=64))
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    chunks, rank, size = 3, 0, layout.num_tokens // 3
    tables = chunk_tables(layout, chunks, DEVICE)
    tol = 2e-3 if CUDA else 1e-5  # float32 dots run as TF32 on the GPU
    for j in range(chunks):
        step = ring_steps(plan, chunks, rank)[j]
        if step is None:
            continue
        counts, indices = (t.expand(1, 2, *t.shape[2:]).clone() for t in step)
        counts[0, 1, 0] = 0  # a query block of head 1 that keeps nothing in this chunk
        args = (q[:, :, :size], k[:, :, j * size:(j + 1) * size], v[:, :, j * size:(j + 1) * size],
                tables[rank].slots, counts, indices, layout.block_size, 0.125)
        out, lse = sparse_attention_triton(*args, key_perm=tables[j].slots, return_lse=True)
        ref, ref_lse = sparse_attention_reference(*args, key_perm=tables[j].slots, return_lse=True)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
        empty = tables[rank].slots.view(-1, layout.block_size)[0]
        empty = empty[empty >= 0]
        assert bool((lse[0, 1, empty] == float("-inf")).all()) and bool((out[0, 1, empty] == 0).all())


@pytest.mark.parametrize("tail", [None, FIXED], ids=["none", "pooled-var"])
def test_simulated_ring_on_the_triton_backend(tail):
    _triton()
    layout = LAYOUTS[0]
    q, k, v = (t.half().to(DEVICE) for t in _inputs(layout, B=1, H=2, D=64))
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    single = sv.sparse_attention(q, k, v, plan, tail=tail, backend="reference")
    out, ran = simulate_ring(q, k, v, plan, 2, tail=tail, backend="triton")
    torch.testing.assert_close(out, single, atol=2e-3, rtol=2e-3)
    assert torch.equal(ran, needed_steps(plan, 2))
    if CUDA:  # auto picks the Triton step on the GPU
        torch.testing.assert_close(simulate_ring(q, k, v, plan, 2, tail=tail)[0], out)


def test_ring_refuses_backends_without_a_ring_step():
    layout = LAYOUTS[0]
    q, k, v = _inputs(layout)
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    with pytest.raises(NotImplementedError, match="NYI: backend 'flex' under ring attention"):
        simulate_ring(q, k, v, plan, 2, backend="flex")


# ---------------------------------------------------------------------------------------------- head balance
def test_balanced_order_deals_every_rank_its_share_of_heads():
    costs = torch.tensor([9.0, 8.0, 7.0, 6.0, 4.0, 3.0, 2.0, 1.0])  # the model order: 30 | 10
    order = balanced_order(costs, 2)
    assert sorted(order.tolist()) == list(range(8))
    assert imbalance(costs, order, 2) == 1.0  # dealt 9 | 8, 7 | 6, 4 | 3, 2 | 1: 9+6+4+1 == 8+7+3+2
    assert imbalance(costs, None, 2) > 1.0
    with pytest.raises(ValueError, match="divisible by the 3"):
        balanced_order(costs, 3)


@pytest.mark.parametrize("name", ["draft", "draft-mass", "xattn", "window", "dense"])
def test_head_balance_never_changes_the_result(name):
    """A separable planner plans a head the same wherever it sits, so the heads of a permuted call give
    the permuted output exactly (what Ulysses ranks compute after a balanced split)."""
    layout = LAYOUTS[0]
    q, k, v = _inputs(layout, H=4)
    assert separable(PLANS[name]["method"], PLANS[name]) is None
    plan = sv.plan(q, k, layout, **PLANS[name])
    order = balanced_order(plan.density_per_head().sum(0).expand(4) + torch.arange(4), 2)  # never the identity
    permuted = sv.plan(q[:, order], k[:, order], layout, **PLANS[name])
    assert torch.equal(permuted.to_dense().expand(2, 4, -1, -1), plan.to_dense().expand(2, 4, -1, -1)[:, order])
    out = sv.sparse_attention(q, k, v, plan)
    for rank in range(2):  # each Ulysses rank plans and computes its two heads alone
        heads = order[2 * rank:2 * rank + 2]
        local = sv.plan(q[:, heads], k[:, heads], layout, **PLANS[name])
        assert torch.equal(sv.sparse_attention(q[:, heads], k[:, heads], v[:, heads], local), out[:, heads])


def test_head_balance_refuses_planners_whose_heads_depend_on_each_other():
    layout = LAYOUTS[0]
    q, k, _ = _inputs(layout, H=4)
    for call in (dict(method="random", density=0.3), dict(method="draft", density=0.3, budget="layer")):
        assert separable(call["method"], call) is not None
        plan = sv.plan(q, k, layout, **call)
        # the reason: a rank planning heads 2, 3 alone plans them otherwise than the whole call does
        alone = sv.plan(q[:, 2:], k[:, 2:], layout, **call)
        assert not torch.equal(alone.to_dense(), plan.to_dense()[:, 2:])
    pytest.importorskip("diffusers")
    from tiny_models import tiny_wan

    model = tiny_wan()
    with pytest.raises(ValueError, match="random draws"):
        sv.apply(model, method="random", head_balance=True)
    with pytest.raises(ValueError, match="budget='layer'"):
        sv.apply(model, method="draft", budget="layer", head_balance=True)
    with pytest.raises(TypeError, match="head_balance to be a bool"):
        sv.apply(model, head_balance="yes")


def test_a_new_head_order_takes_effect_only_where_the_layer_replans():
    layout = LAYOUTS[0]
    q, k, _ = _inputs(layout, H=4)
    plan = sv.plan(q, k, layout, method="draft", mass=0.7)
    balance, slot = HeadBalance(), (3, 0)
    assert balance.order(slot, 0, 2) is None  # nothing known: the model's order
    balance.record(slot, plan, 4, step=0)
    costs = balance.take_recorded(slot)
    assert balance.take_recorded(slot) is None  # taken once
    balance.propose(slot, costs, None, 2)
    assert balance.order(slot, 1, 2) is None and balance.version(slot) == 0  # step 1 reuses step 0's plan
    order = balance.order(slot, 2, 2)
    assert order is not None and balance.version(slot) == 1  # step 2 replans: the new order, a new cache key
    assert torch.equal(order, balanced_order(costs, 2))
    # costs come back in the applied order and are mapped to the model's heads before dealing
    balance.propose(slot, costs[order], order, 2)
    assert torch.equal(balance.order(slot, 4, 2), order) and balance.version(slot) == 2
    balance.propose(slot, costs, None, 2)
    assert balance.order(slot, 0, 2) is not None and balance.version(slot) == 3  # a new generation replans too


def test_ring_steps_run_on_the_backends_the_registry_declares():
    """The ring asks the registry (``needs=("ring",)``): the backends with a declared ring step, and nothing else."""
    import sparsevid.parallel.ring as ring
    from sparsevid.parallel.ring import ring_backend

    assert ring.RING_BACKENDS == tuple(d["name"] for d in sv.describe_backends() if d["ring"])
    assert set(ring.RING_BACKENDS) == {"triton", "reference"}
    layout = LAYOUTS[0]
    q, k, _ = _inputs(layout)
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    for name in ("fa4", "triton-int8", "reference-fp8"):
        with pytest.raises(NotImplementedError, match=f"NYI: backend '{name}' under ring attention"):
            ring_backend(name, q, plan)
    assert ring_backend("auto", q, plan) == "reference"  # float32 on the CPU: triton is for CUDA and fp16
