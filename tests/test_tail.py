"""The tail (``tail=``): summaries of the skipped blocks in the same softmax (issue 22).

Oracles built here, independently of ``sparsevid.tail``: a dense float64 softmax over the plan's kept
keys plus one column per skipped summary group, written from the formula in the module docstring.
Triton kernels run under the interpreter on the CPU (fp16: its bf16 dot is wrong there).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import sparsevid as sv
from sparsevid.tail import TAIL_METHODS

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
METHODS = list(TAIL_METHODS)


def _layouts():
    return [
        sv.VideoLayout(2, 5, 7, tile=(4, 4), block_size=32),  # ragged last block
        sv.VideoLayout(2, 4, 8, text_tokens=5, tile=(4, 4), block_size=32),  # text last
        sv.VideoLayout(4, 8, 8, text_tokens=7, text_first=True, tile=(4, 8), block_size=64),  # text first, 2 groups
    ]


def oracle(q, k, v, plan, group, scale):
    """float64 attention over the kept keys and the summary terms of the skipped groups (per query row)."""
    layout = plan.layout
    B, H, L, D = q.shape
    q, k, v = (t.double() for t in (q, k, v))
    mask = plan.to_mask().expand(B, H, L, L)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    slots = layout.perm
    groups = slots.view(-1, group)
    kept = plan.to_dense().expand(B, H, -1, -1)  # (B, H, NB, NB)
    query_block = torch.empty(L, dtype=torch.long)
    query_block[slots[slots >= 0]] = torch.arange(layout.num_slots)[slots >= 0] // layout.block_size
    logits, values = [], []
    for j, members in enumerate(groups):
        members = members[members >= 0]
        if members.numel() == 0:
            continue
        kj, vj = k[:, :, members], v[:, :, members]
        mean, vmean = kj.mean(2), vj.mean(2)  # (B, H, D)
        var = ((kj - mean[:, :, None]) ** 2).mean(2)
        radius = (kj - mean[:, :, None]).norm(dim=-1).amax(-1)  # (B, H)
        z = (q @ mean[..., None])[..., 0] * scale + math.log(members.numel())
        gauss = 0.5 * scale * scale * (q * q * var[:, :, None]).sum(-1)
        bound = scale * q.norm(dim=-1) * radius[..., None]
        z = z + torch.minimum(gauss, bound)
        skipped = ~kept[:, :, query_block, (j * group) // layout.block_size]  # (B, H, L)
        logits.append(z.masked_fill(~skipped, float("-inf")))
        values.append(vmean)
    z = torch.stack(logits, -1)  # (B, H, L, G)
    probs = torch.softmax(torch.cat([scores, z], -1), -1)
    return probs[..., :L] @ v + probs[..., L:] @ torch.stack(values, 2)


def _inputs(layout, B=2, H=3, D=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, layout.num_tokens, D, generator=g).to(DEVICE, dtype) for _ in range(3)]


@pytest.mark.parametrize("layout", _layouts(), ids=["ragged", "text-last", "text-first"])
@pytest.mark.parametrize("method", METHODS)
def test_reference_equals_oracle(layout, method):
    q, k, v = _inputs(layout)
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    got = sv.sparse_attention(q, k, v, plan, tail=method, backend="reference")
    want = oracle(q.cpu(), k.cpu(), v.cpu(), plan.to("cpu"), TAIL_METHODS[method].group_size(layout), 64 ** -0.5)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5)
    # and it is not the plain sparse result: the summaries change every row that skips something
    plain = sv.sparse_attention(q, k, v, plan, backend="reference")
    assert (got - plain).abs().max() > 1e-3


def test_tail_none_is_todays_result_bit_for_bit():
    layout = _layouts()[1]
    q, k, v = _inputs(layout)
    plan = sv.plan(q, k, layout, method="random", density=0.3)
    backends = ["reference"] + (["triton"] if CUDA or _interpreted() else [])
    for backend in backends:
        dtype = torch.float32 if backend == "reference" else torch.float16
        a, b, c = (t.to(dtype) for t in (q, k, v))
        assert torch.equal(sv.sparse_attention(a, b, c, plan, tail=None, backend=backend),
                           sv.sparse_attention(a, b, c, plan, backend=backend))
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.to_mask())
    torch.testing.assert_close(sv.sparse_attention(q, k, v, plan, tail=None), masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_plan_keeping_every_block_gives_dense_with_any_tail(method):
    layout = _layouts()[0]
    q, k, v = _inputs(layout)
    dense = F.scaled_dot_product_attention(q, k, v)
    nb = layout.num_blocks
    full = sv.BlockPlan.from_block_mask(layout, torch.ones(1, 1, nb, nb, dtype=torch.bool, device=DEVICE))
    for plan in (full, sv.plan(q, k, layout, method="dense")):
        torch.testing.assert_close(sv.sparse_attention(q, k, v, plan, tail=method, backend="reference"), dense,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_planted_constant_blocks_make_the_summary_exact(method):
    """Each summary group's keys are identical and its values constant: one term with logit
    ``s q·k + log n`` is exactly the group's share of the softmax, so the tail output is dense attention."""
    layout = sv.VideoLayout(2, 8, 8, tile=(4, 8), block_size=32)
    group = TAIL_METHODS[method].group_size(layout)
    g = torch.Generator().manual_seed(1)
    B, H, D, L = 1, 2, 32, layout.num_tokens
    per_group_k = torch.randn(B, H, layout.num_slots // group, D, generator=g) * 2
    per_group_v = torch.randn(B, H, layout.num_slots // group, D, generator=g)
    group_of_token = layout.inverse_perm // group
    k, v = per_group_k[:, :, group_of_token], per_group_v[:, :, group_of_token]
    q = torch.randn(B, H, L, D, generator=g)
    plan = sv.plan(q, k, layout, method="random", density=0.2)
    got = sv.sparse_attention(q, k, v, plan, tail=method, backend="reference")
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5)
    assert (sv.sparse_attention(q, k, v, plan) - dense).abs().max() > 1e-2  # dropping is not exact here


def _interpreted():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


needs_triton = pytest.mark.skipif(not (CUDA or _interpreted()) or pytest.importorskip("triton") is None,
                                  reason="Triton kernels need CUDA or the interpreter")


@needs_triton
@pytest.mark.parametrize("layout", _layouts(), ids=["ragged", "text-last", "text-first"])
@pytest.mark.parametrize("broadcast", [None, "heads"])
def test_triton_kernel_equals_reference_twin(layout, broadcast):
    """The fused kernel (exact blocks + summary terms in one online softmax) against the reference,
    fp16, batch 2, per-head plans and a plan broadcast over heads."""
    q, k, v = _inputs(layout, dtype=torch.float16, seed=2)
    plan = sv.plan(q.float(), k.float(), layout, method="draft", density=0.3)
    if broadcast == "heads":
        plan = plan[:, :1]
    for method in METHODS:
        want = sv.sparse_attention(q, k, v, plan, tail=method, backend="reference").float()
        got = sv.sparse_attention(q, k, v, plan, tail=method, backend="triton").float()
        assert ((got - want).norm() / want.norm()) < 2e-3, method


@needs_triton
def test_triton_summaries_equal_reference():
    from sparsevid.kernels.triton_tail import summarize_triton
    from sparsevid.tail import summarize_reference

    layout = _layouts()[2]
    k, v, _ = _inputs(layout, D=96, dtype=torch.float16, seed=3)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D) memory, read in place
    for method in METHODS:
        group = TAIL_METHODS[method].group_size(layout)
        got, want = summarize_triton(k, v, layout, group), summarize_reference(k, v, layout, TAIL_METHODS[method])
        for name in ("keys", "values", "key_var", "key_radius", "log_count"):
            torch.testing.assert_close(getattr(got, name).float(), getattr(want, name).float(), rtol=2e-3, atol=2e-3,
                                       msg=f"{method} {name}")


@needs_triton
@pytest.mark.parametrize("method", METHODS)
def test_merge_kernel_adds_the_tail_to_an_exact_partial(method):
    """The ``fa4`` path: an exact partial (output and natural-log LSE over the kept keys, in tile order) plus
    the tail pass equals the reference with the tail, and lands in the original token order."""
    from sparsevid.kernels.triton_tail import summarize_triton, tail_merge
    from sparsevid.tail import kept_blocks

    layout = _layouts()[1]
    q, k, v = _inputs(layout, dtype=torch.float16, seed=4)
    plan = sv.plan(q.float(), k.float(), layout, method="draft", density=0.3)
    scale = 64 ** -0.5
    scores = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~plan.to_mask(), float("-inf"))
    order = layout.perm[: layout.num_tokens].to(DEVICE)
    partial = (torch.softmax(scores, -1) @ v.float()).half()[:, :, order]  # the exact partial, tile order
    lse = torch.logsumexp(scores, -1)[:, :, order]
    s = summarize_triton(k, v, layout, TAIL_METHODS[method].group_size(layout))
    kept = kept_blocks(plan).expand(*q.shape[:2], -1, -1)
    got = tail_merge(q[:, :, order], partial, lse, layout.on(DEVICE).perm, s.keys, s.values, s.key_var, s.key_radius,
                     s.log_count, kept, s.per_block, layout.block_size, scale, q).float()
    want = sv.sparse_attention(q, k, v, plan, tail=method, backend="reference").float()
    assert ((got - want).norm() / want.norm()) < 2e-3


def test_reference_tail_trains():
    """Gradients through the summaries (the reference backend trains with a tail) match the oracle's."""
    layout = _layouts()[0]
    q, k, v = _inputs(layout, B=1, H=2, D=16)
    plan = sv.plan(q, k, layout, method="random", density=0.3)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    runs = ((lambda a, b, c: sv.sparse_attention(a, b, c, plan, tail="pooled-var"), DEVICE),
            (lambda a, b, c: oracle(a, b, c, plan.to("cpu"), layout.block_size, 16 ** -0.5), "cpu"))
    grads = []
    for fn, device in runs:
        leaves = [t.detach().to(device).clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves).double() * weight.double().to(device)).sum().backward()
        grads.append([t.grad.double().cpu() for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_tail_under_torch_compile_equals_eager():
    """The summaries' group tables are built eagerly once (torch 2.13's CPU inductor miscompiles the
    ``arange // group`` they need: inside a compiled region the call asked for 1e15 bytes)."""
    layout = sv.VideoLayout(2, 5, 7, tile=(4, 4), block_size=32)
    q, k, v = _inputs(layout, B=1, H=2, D=16, seed=6)
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    eager = sv.sparse_attention(q, k, v, plan, tail="pooled-var")
    compiled = torch.compile(lambda a, b, c: sv.sparse_attention(a, b, c, plan, tail="pooled-var"))
    torch.testing.assert_close(compiled(q, k, v), eager, rtol=1e-4, atol=1e-5)


def test_bad_tail_values_are_refused_with_the_accepted_names():
    layout = _layouts()[0]
    q, k, v = _inputs(layout)
    plan = sv.plan(q, k, layout, method="random", density=0.3)
    for bad in ("mean", "", 1, True):
        with pytest.raises(ValueError, match="pooled-var"):
            sv.sparse_attention(q, k, v, plan, tail=bad)
    with pytest.raises(ValueError, match="quant=None"):
        sv.sparse_attention(q, k, v, plan, tail="pooled-var", quant="int8")
    token_plan = sv.plan(q, k, layout, method="finegrained", density=0.3)
    with pytest.raises(TypeError, match="BlockPlan"):
        sv.sparse_attention(q, k, v, token_plan, tail="pooled-var")
    small = sv.VideoLayout(2, 4, 4, tile=(4, 4), block_size=16)
    q2, k2, v2 = _inputs(small)
    with pytest.raises(ValueError, match="divide block_size=16"):
        sv.sparse_attention(q2, k2, v2, sv.plan(q2, k2, small, method="random", density=0.5), tail="pooled-var-32")


def test_apply_refuses_bad_tail_settings():
    pytest.importorskip("diffusers")
    from tiny_models import tiny_wan

    model = tiny_wan()
    with pytest.raises(ValueError, match="pooled-var"):
        sv.apply(model, method="draft", density=0.3, tail="mean")
    with pytest.raises(ValueError, match="no tail pass"):
        sv.apply(model, method="draft", density=0.3, tail="pooled-var", backend="flex")
    with pytest.raises(ValueError, match="no tail pass|quant=None"):
        sv.apply(model, method="draft", density=0.3, tail="pooled-var", quant="int8")
    with pytest.raises(TypeError, match="BlockPlan"):
        sv.apply(model, method="finegrained", density=0.3, tail="pooled-var")
    with pytest.raises(ValueError, match="method"):
        sv.apply(model, method=None, tail="pooled-var")
    assert not hasattr(model, "_diffusers_hook") or model._diffusers_hook.get_hook("sparsevid_state") is None
    handle = sv.apply(model, method="draft", density=0.3, tail="pooled-var")
    assert "tail='pooled-var'" in repr(handle)
    handle.remove()


def test_auto_gives_a_tail_only_to_backends_with_a_tail_pass():
    from sparsevid.backends import resolve_backend, tail_backends
    from sparsevid.tail import check_tail

    assert set(tail_backends()) == {"reference", "triton", "fa4"}
    layout = _layouts()[0]
    q, k, _ = _inputs(layout)
    plan = sv.plan(q, k, layout, method="random", density=0.3)
    assert resolve_backend("auto", q, plan, tail=check_tail("pooled-var")).tail
    with pytest.raises(ValueError, match="no tail pass"):
        resolve_backend("flex", q, plan, tail=check_tail("pooled-var"))


def test_each_tail_backend_declares_its_summary_builder():
    """How summaries are built is chosen once, at registration: the backends with a tail are exactly those that
    declare a builder, and the reference's builder is the PyTorch twin."""
    from sparsevid.backends import backend_spec, describe_backends, tail_backends
    from sparsevid.tail import summarize_reference

    assert set(tail_backends()) == {d["name"] for d in describe_backends() if backend_spec(d["name"]).summarize}
    assert backend_spec("reference").summarize is summarize_reference
    assert backend_spec("fa4").summarize is backend_spec("triton").summarize  # one Triton summary pass
    assert backend_spec("flex").summarize is None and not backend_spec("flex").tail
