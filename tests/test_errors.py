"""Bad input gets a clear TypeError/ValueError naming the argument, before any computation."""

import pytest
import torch

import sparsevid as sv

LAYOUT = sv.VideoLayout(frames=2, height=4, width=8, tile=(4, 4), block_size=16)
L = LAYOUT.num_tokens


def qkv(shape=(1, 2, L, 16), dtype=torch.float32):
    return tuple(torch.randn(shape, dtype=dtype) for _ in range(3))


Q, K, V = qkv()
PLAN = sv.plan(Q, K, LAYOUT, method="random", density=0.5)
NAN = Q.clone()
NAN[0, 0, 3, 1] = float("nan")
INF = K.clone()
INF[0, 1, 5, 0] = float("inf")

CASES = [
    # (description, call, exception, message fragment)
    ("layout frames", lambda: sv.VideoLayout(frames=0, height=4, width=4), ValueError, "frames"),
    ("layout float", lambda: sv.VideoLayout(frames=2.0, height=4, width=4), TypeError, "frames"),
    ("layout tile too big", lambda: sv.VideoLayout(2, 4, 8, tile=(8, 8), block_size=16), ValueError, "tile"),
    ("layout block size", lambda: sv.VideoLayout(2, 4, 8, block_size=20), ValueError, "block_size"),
    ("layout text", lambda: sv.VideoLayout(2, 4, 8, text_tokens=-1), ValueError, "text_tokens"),
    ("plan unknown method", lambda: sv.plan(Q, K, LAYOUT, method="nope"), ValueError, "method"),
    ("plan density 0", lambda: sv.plan(Q, K, LAYOUT, method="draft", density=0.0), ValueError, "density"),
    ("plan density > 1", lambda: sv.plan(Q, K, LAYOUT, method="draft", density=1.5), ValueError, "density"),
    ("plan density str", lambda: sv.plan(Q, K, LAYOUT, method="draft", density="0.1"), TypeError, "density"),
    ("plan mass > 1", lambda: sv.plan(Q, K, LAYOUT, method="draft", mass=2.0), ValueError, "mass"),
    ("plan both budgets", lambda: sv.plan(Q, K, LAYOUT, method="draft", density=0.1, mass=0.5), ValueError, "density"),
    ("plan mass for random", lambda: sv.plan(Q, K, LAYOUT, method="random", mass=0.5), ValueError, "mass"),
    ("plan L mismatch", lambda: sv.plan(Q[:, :, :-1], K[:, :, :-1], LAYOUT), ValueError, "L="),
    ("plan rank", lambda: sv.plan(Q[0], K[0], LAYOUT), ValueError, "q of shape"),
    ("plan layout type", lambda: sv.plan(Q, K, (2, 4, 8)), TypeError, "layout"),
    ("plan int q", lambda: sv.plan(Q.long(), K.long(), LAYOUT), TypeError, "floating-point"),
    ("plan q/k dtypes", lambda: sv.plan(Q, K.double(), LAYOUT), TypeError, "dtype"),
    ("plan NaN q", lambda: sv.plan(NAN, K, LAYOUT, method="draft"), ValueError, "finite"),
    ("plan Inf k", lambda: sv.plan(Q, INF, LAYOUT, method="xattn"), ValueError, "finite"),
    ("plan bad budget", lambda: sv.plan(Q, K, LAYOUT, method="draft", budget="all"), ValueError, "budget"),
    ("plan bad stride", lambda: sv.plan(Q, K, LAYOUT, method="xattn", stride=5), ValueError, "stride"),
    ("plan bad radius", lambda: sv.plan(Q, K, LAYOUT, method="window", radius=(1, 1)), ValueError, "radius"),
    ("plan unknown option", lambda: sv.plan(Q, K, LAYOUT, method="draft", colour=1), TypeError, "colour"),
    ("plan kv dtype", lambda: sv.BlockPlan(LAYOUT, PLAN.kv_num_blocks.long(), PLAN.kv_indices), TypeError, "kv_num_blocks"),
    ("plan kv shape", lambda: sv.BlockPlan(LAYOUT, PLAN.kv_num_blocks[..., :-1], PLAN.kv_indices), ValueError, "kv_num_blocks"),
]


ATTENTION_CASES = [
    # (description, (q, k, v, plan), keyword arguments, exception, message fragment)
    ("q type", (Q.numpy(), K, V, PLAN), {}, TypeError, "q"),
    ("rank", (Q[0], K[0], V[0], PLAN), {}, ValueError, "4-D"),
    ("dtype", (Q.double(), K.double(), V.double(), PLAN), {}, TypeError, "dtype"),
    ("mixed dtype", (Q, K.half(), V, PLAN), {}, TypeError, "one dtype"),
    ("k/v shapes", (Q, K, V[..., :8], PLAN), {}, ValueError, "k and v"),
    ("head dim", (Q[..., :8], K, V, PLAN), {}, ValueError, "head dim"),
    ("L mismatch", (*qkv((1, 2, L + 1, 16)), PLAN), {}, ValueError, "L="),
    ("plan heads", (*qkv((1, 3, L, 16)), PLAN), {}, ValueError, "heads"),
    ("plan type", (Q, K, V, PLAN.to_mask()), {}, TypeError, "plan"),
    ("backend", (Q, K, V, PLAN), {"backend": "cuda"}, ValueError, "backend"),
    ("scale", (Q, K, V, PLAN), {"scale": -1.0}, ValueError, "scale"),
]


@pytest.mark.parametrize("call,exc,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


@pytest.mark.parametrize("backend", ["reference", "triton", "flex"])
@pytest.mark.parametrize("args,kwargs,exc,fragment", [c[1:] for c in ATTENTION_CASES], ids=[c[0] for c in ATTENTION_CASES])
def test_every_backend_rejects_bad_input_before_launch(backend, args, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        sv.sparse_attention(*args, **{"backend": backend, **kwargs})


def test_triton_backend_limits_are_checked_before_launch():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors: the interpreter (tests only)
    q, k, v, plan = Q.to(device), K.to(device), V.to(device), PLAN.to(device)
    with pytest.raises(TypeError, match="backend 'triton'"):
        sv.sparse_attention(q, k, v, plan, backend="triton")  # float32: the reference's job
    with pytest.raises(ValueError, match="head_dim"):
        sv.sparse_attention(q.half(), k.half(), v.half(), plan, backend="triton")  # head dim 16


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda n, i: (n.fill_(0), i), "kv_num_blocks"),
        (lambda n, i: (n, i.fill_(99)), "range"),
        (lambda n, i: (n, i.flip(-1)), "ascending"),
        (lambda n, i: (n.fill_(1), i.fill_(0)), "own block"),
    ],
    ids=["empty rows", "index out of range", "unsorted", "own block dropped"],
)
def test_validate_catches_broken_plans(mutate, fragment):
    n, i = mutate(PLAN.kv_num_blocks.clone(), PLAN.kv_indices.clone())
    with pytest.raises(ValueError, match=fragment):
        sv.BlockPlan(LAYOUT, n, i).validate()


def test_validate_requires_dense_text():
    layout = sv.VideoLayout(frames=1, height=4, width=8, text_tokens=5, tile=(4, 4), block_size=16)
    nb = layout.num_blocks
    keep = torch.eye(nb, dtype=torch.bool)[None, None]
    with pytest.raises(ValueError, match="text"):
        sv.BlockPlan.from_block_mask(layout, keep).validate()


BROKEN_PLANS = [
    (lambda n, i: (n, i.fill_(99)), "range"),
    (lambda n, i: (n, i.fill_(-1)), "range"),
    (lambda n, i: (n.fill_(LAYOUT.num_blocks), i[..., :1].contiguous()), "max_kept"),  # counts wider than the list
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mutate,fragment", BROKEN_PLANS, ids=["index 99", "index -1", "counts past the list"])
def test_a_hand_built_plan_is_validated_before_its_first_launch(backend, mutate, fragment):
    """Defect (issue 23): out-of-range indices in a BlockPlan built from tensors crashed the process in triton."""
    n, i = mutate(PLAN.kv_num_blocks.clone(), PLAN.kv_indices.clone())
    q = Q
    if backend == "triton":  # CPU: the interpreter (conftest), where the bad plan crashed the process
        pytest.importorskip("triton")
        q = torch.randn(1, 2, L, 64, dtype=torch.float16, device="cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=fragment):
        sv.sparse_attention(q, q, q, sv.BlockPlan(LAYOUT, n.to(q.device), i.to(q.device)), backend=backend)


def test_a_hand_built_token_plan_is_validated_before_its_first_launch():
    token = sv.plan(Q, K, LAYOUT, method="finegrained", density=0.5)
    bad = sv.TokenPlan(LAYOUT, token.kv_num_tokens, token.kv_tokens.clone().fill_(L))
    with pytest.raises(ValueError, match="kv_tokens in"):
        sv.sparse_attention(Q, K, V, bad)


def test_hand_built_plans_are_validated_once_and_planner_plans_never(monkeypatch):
    calls = []
    validate = sv.BlockPlan.validate
    monkeypatch.setattr(sv.BlockPlan, "validate", lambda self: calls.append(self) or validate(self))
    planned = sv.plan(Q, K, LAYOUT, method="random", density=0.5, validate=False)
    sv.sparse_attention(Q, K, V, planned)
    sv.sparse_attention(Q, K, V, planned[:, 1])  # a slice keeps what is known of its plan
    assert calls == []
    by_hand = sv.BlockPlan(LAYOUT, planned.kv_num_blocks, planned.kv_indices)
    sv.sparse_attention(Q, K, V, by_hand)
    sv.sparse_attention(Q, K, V, by_hand)
    assert calls == [by_hand]


def test_keeps_everything_survives_to_and_slicing():
    """Defect (issue 23): plan.to() and plan[...] dropped keeps_everything (fa4's dense shortcut)."""
    dense = sv.plan(Q, K, LAYOUT, method="dense")
    assert dense.keeps_everything and dense.to("cpu").keeps_everything and dense[0].keeps_everything
    assert not PLAN.to("cpu").keeps_everything
