"""The tail (``tail=``): summaries of the skipped blocks in the same softmax (issue 22), and the call's
decision on how much of them each head takes (issue 31).

Oracles built here, independently of ``sparsevid.tail``: a dense float64 softmax over the plan's kept
keys plus one column per skipped summary group, written from the formula in the module docstring (with a
per-head decision ``(log w, c)`` added to the columns' logits); dense attention for the planted inputs.
Triton kernels run under the interpreter on the CPU (fp16: its bf16 dot is wrong there).
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import sparsevid as sv
from sparsevid.tail import (PROBES, TAIL_METHODS, TAIL_WEIGHTS, choose_tail, decide_tail, kept_blocks, probe_rows,
                            summarize_reference)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
METHODS = list(TAIL_METHODS)


def _layouts():
    return [
        sv.VideoLayout(2, 5, 7, tile=(4, 4), block_size=32),  # ragged last block
        sv.VideoLayout(2, 4, 8, text_tokens=5, tile=(4, 4), block_size=32),  # text last
        sv.VideoLayout(4, 8, 8, text_tokens=7, text_first=True, tile=(4, 8), block_size=64),  # text first, 2 groups
    ]


def oracle(q, k, v, plan, group, scale, gate=None):
    """float64 attention over the kept keys and the summary terms of the skipped groups (per query row);
    ``gate`` ``(B, H, 2)``: each head's ``(log w, c)``, ``c`` weighting the variance term, ``log w`` added."""
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
        if gate is None:
            z = z + torch.minimum(gauss, bound)
        else:
            g = gate.double()[:, :, None]
            z = z + g[..., 1] * torch.minimum(gauss, bound) + g[..., 0]
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
    """The summaries taken as they are (``fixed()``: no decision) follow the formula."""
    q, k, v = _inputs(layout)
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    got = sv.sparse_attention(q, k, v, plan, tail=TAIL_METHODS[method].fixed(), backend="reference")
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
    got = sv.sparse_attention(q, k, v, plan, tail=method, backend="reference")  # with the call's decision
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5)
    assert (sv.sparse_attention(q, k, v, plan) - dense).abs().max() > 1e-2  # dropping is not exact here
    summaries = summarize_reference(k, v, layout, TAIL_METHODS[method])
    gate = decide_tail(q, k, v, layout, kept_blocks(plan), summaries, 32 ** -0.5)
    assert bool((gate[..., 0] == 0).all())  # every head keeps the summaries, at full weight


def _interpreted():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


needs_triton = pytest.mark.skipif(not (CUDA or _interpreted()) or pytest.importorskip("triton") is None,
                                  reason="Triton kernels need CUDA or the interpreter")


@needs_triton
@pytest.mark.parametrize("layout", _layouts(), ids=["ragged", "text-last", "text-first"])
@pytest.mark.parametrize("broadcast", [None, "heads"])
def test_triton_kernel_equals_reference_twin(layout, broadcast):
    """The fused kernel (exact blocks + summary terms in one online softmax) against the reference through
    the backends, fp16, batch 2, per-head plans and a plan broadcast over heads; the summaries as they are
    and with the call's decision (the same decision from either backend's summaries)."""
    from sparsevid.kernels.triton_tail import summarize_triton

    q, k, v = _inputs(layout, dtype=torch.float16, seed=2)
    plan = sv.plan(q.float(), k.float(), layout, method="draft", density=0.3)
    if broadcast == "heads":
        plan = plan[:, :1]
    for method in METHODS:
        m = TAIL_METHODS[method]
        gates = [decide_tail(q, k, v, layout, kept_blocks(plan), s, 64 ** -0.5)
                 for s in (summarize_reference(k, v, layout, m), summarize_triton(k, v, layout, m.group_size(layout)))]
        assert torch.equal(*gates), method
        for tail in (m.fixed(), m):
            want = sv.sparse_attention(q, k, v, plan, tail=tail, backend="reference").float()
            got = sv.sparse_attention(q, k, v, plan, tail=tail, backend="triton").float()
            assert ((got - want).norm() / want.norm()) < 2e-3, tail


def _mixed_gate(B, H):
    """One decision per (batch, head), cycling: drop, mean summaries at w = 1/2, corrected ones at w = 1 and 1/4."""
    options = torch.tensor([[float("-inf"), 0.0], [math.log(0.5), 0.0], [0.0, 1.0], [math.log(0.25), 1.0]])
    return options[torch.arange(B * H) % len(options)].view(B, H, 2).contiguous().to(DEVICE)


@needs_triton
@pytest.mark.parametrize("layout", _layouts(), ids=["ragged", "text-last", "text-first"])
def test_triton_kernels_read_the_decision_as_the_reference_does(layout):
    """fp32, calling the kernels directly: the fused kernel and the merge kernel with a per-head decision
    (one head dropping, one taking mean summaries at half weight, ...) against the reference twin and the
    oracle; batch 2, per-head plans. The decision is given (``gate``), so both read the same one; on CUDA the
    kernels differ from the twin by their TF32 dots only."""
    from sparsevid.kernels.reference import sparse_attention_reference
    from sparsevid.kernels.triton_blocksparse import sparse_attention_triton
    from sparsevid.kernels.triton_tail import summarize_triton, tail_merge

    q, k, v = _inputs(layout, seed=7)
    B, H = q.shape[:2]
    plan = sv.plan(q, k, layout, method="draft", density=0.3)
    counts, indices = plan.kv_num_blocks.expand(B, H, -1), plan.kv_indices.expand(B, H, -1, -1)
    kept = kept_blocks(plan).expand(B, H, -1, -1)
    perm, bs, scale = layout.on(DEVICE).perm, layout.block_size, 64 ** -0.5
    gate = _mixed_gate(B, H)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~plan.to_mask(), float("-inf"))
    order = layout.perm[: layout.num_tokens].to(DEVICE)
    partial, lse = (torch.softmax(scores, -1) @ v)[:, :, order], torch.logsumexp(scores, -1)[:, :, order]
    for method in METHODS:
        m = TAIL_METHODS[method]
        group = m.group_size(layout)
        want = sparse_attention_reference(q, k, v, perm, counts, indices, bs, scale,
                                          tail=summarize_reference(k, v, layout, m), kept=kept, gate=gate)
        torch.testing.assert_close(want.double().cpu(), oracle(q.cpu(), k.cpu(), v.cpu(), plan.to("cpu"), group, scale,
                                                               gate.cpu()), rtol=1e-4, atol=1e-5)
        s = summarize_triton(k, v, layout, group)
        fused = sparse_attention_triton(q, k, v, perm, counts, indices, bs, scale, tail=s, kept=kept, gate=gate)
        merged = tail_merge(q[:, :, order], partial, lse, perm, s.keys, s.values, s.key_var, s.key_radius, s.log_count,
                            kept, gate, s.per_block, bs, scale, q)
        for got in (fused, merged):
            if CUDA:  # the kernels' float32 tl.dot runs in TF32 there (10-bit mantissa; the reference's matmuls do not):
                # rounding q, k, v alone to TF32 moves a head's output by up to 4e-4 (rel. L2, emulated on the CPU),
                # P's rounding adds about as much, while a head reading another head's decision moves by >= 4e-2
                err = ((got - want).flatten(2).norm(dim=-1) / want.flatten(2).norm(dim=-1)).max()
                assert err < 3e-3, (method, float(err))
            else:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5, msg=method)
        dropped = sparse_attention_reference(q, k, v, perm, counts, indices, bs, scale)
        if CUDA:  # TF32, as above
            assert float((fused[0, 0] - dropped[0, 0]).norm() / dropped[0, 0].norm()) < 3e-3, method
        else:
            torch.testing.assert_close(fused[0, 0], dropped[0, 0], rtol=1e-4, atol=2e-5)  # the head that drops


@needs_triton
def test_fp16_keys_with_in_block_spread_1e3_stay_finite():
    """A key channel at ±1000 inside every block: its variance (1e6) is past float16's range; the Triton
    tail paths (fused and merge) keep the variance term in float32 and match the reference and the oracle."""
    from sparsevid.kernels.triton_tail import summarize_triton, tail_merge

    layout = _layouts()[0]
    q, k, v = _inputs(layout, B=1, H=2, seed=8)
    k[..., 0] = 1000 * torch.randn(k.shape[:3], generator=torch.Generator().manual_seed(9)).sign().to(DEVICE)
    q[..., 0] *= 0.01  # the variance term stays under its clip (about 1.3 against 1000): it is what is measured
    q, k, v = (t.half() for t in (q, k, v))
    eye = torch.eye(layout.num_blocks, dtype=torch.bool, device=DEVICE)
    plan = sv.BlockPlan.from_block_mask(layout, eye[None, None])
    scale, method = 64 ** -0.5, TAIL_METHODS["pooled-var"]
    want = oracle(q.cpu(), k.cpu(), v.cpu(), plan.to("cpu"), layout.block_size, scale)
    ref = sv.sparse_attention(q, k, v, plan, tail=method.fixed(), backend="reference")
    fused = sv.sparse_attention(q, k, v, plan, tail=method.fixed(), backend="triton")
    scores = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~plan.to_mask(), float("-inf"))
    order = layout.perm[: layout.num_tokens].to(DEVICE)
    s = summarize_triton(k, v, layout, layout.block_size)
    merged = tail_merge(q[:, :, order], (torch.softmax(scores, -1) @ v.float()).half()[:, :, order],
                        torch.logsumexp(scores, -1)[:, :, order], layout.on(DEVICE).perm, s.keys, s.values, s.key_var,
                        s.key_radius, s.log_count, kept_blocks(plan).expand(1, 2, -1, -1),
                        torch.tensor([0.0, 1.0], device=DEVICE).expand(1, 2, 2).contiguous(), s.per_block,
                        layout.block_size, scale, q)
    assert bool(torch.isinf(s.key_var.half()).any())  # the case: the variance does not fit float16
    for got in (ref, fused, merged):
        assert bool(got.isfinite().all())
        assert ((got.double().cpu() - want).norm() / want.norm()) < 2e-3
    decided = [sv.sparse_attention(q, k, v, plan, tail=method, backend=b).float() for b in ("reference", "triton")]
    assert ((decided[1] - decided[0]).norm() / decided[0].norm()) < 2e-3


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
    from sparsevid.tail import fixed_gate

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
                     s.log_count, kept, fixed_gate(*q.shape[:2], DEVICE), s.per_block, layout.block_size, scale,
                     q).float()
    want = sv.sparse_attention(q, k, v, plan, tail=TAIL_METHODS[method].fixed(), backend="reference").float()
    assert ((got - want).norm() / want.norm()) < 2e-3


def test_reference_tail_trains():
    """Gradients through the summaries (the reference backend trains with a tail) match the oracle's."""
    layout = _layouts()[0]
    q, k, v = _inputs(layout, B=1, H=2, D=16)
    plan = sv.plan(q, k, layout, method="random", density=0.3)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    fixed = TAIL_METHODS["pooled-var"].fixed()
    runs = ((lambda a, b, c: sv.sparse_attention(a, b, c, plan, tail=fixed), DEVICE),
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


# --------------------------------------------------------------------------------------- the decision
def _two_blocks():
    """Two 16-token blocks (one 4x4 frame each), each query block keeping only its own block."""
    layout = sv.VideoLayout(2, 4, 4, tile=(4, 4), block_size=16)
    plan = sv.BlockPlan.from_block_mask(layout, torch.eye(2, dtype=torch.bool, device=DEVICE)[None, None])
    return layout, plan


def _tail_backends():
    return ["reference"] + (["triton"] if CUDA or _interpreted() else [])


def _run(q, k, v, plan, backend, tail):
    dtype = torch.float32 if backend == "reference" else torch.float16
    return sv.sparse_attention(*(t.to(dtype) for t in (q, k, v)), plan, tail=tail, backend=backend).float()


def _overshoot_inputs(B=1, H=2, D=64):
    """Block b's queries are ``c (e_2b - e_2b+1) / √2``; the other block's keys spread ±20 along the one
    direction ``(e_2b + e_2b+1) / √2``, orthogonal to those queries, around a mean they score at ``-12``: the
    skipped block's exact mass is ``e^-12`` of the kept one's, but the per-channel (diagonal) Gaussian
    estimate reads the spread as ``+20`` (clipped at ``s |q| r``), so the corrected summary claims ``e^8``."""
    g = torch.Generator().manual_seed(11)
    L, scale = 32, D ** -0.5
    along, across = torch.zeros(2, D), torch.zeros(2, D)
    for b in range(2):
        along[b, 2 * b], along[b, 2 * b + 1] = 2 ** -0.5, 2 ** -0.5
        across[b, 2 * b], across[b, 2 * b + 1] = 2 ** -0.5, -(2 ** -0.5)
    block = torch.arange(L) // 16
    c = (0.8 + 0.4 * torch.rand(B, H, L, 1, generator=g)) / scale  # s c in [0.8, 1.2]
    q = c * across[block]
    sign = torch.tensor([1.0, -1.0]).repeat(8)[torch.arange(L) % 16].view(L, 1)
    k = 20 * sign * along[1 - block] - 12 * across[1 - block]  # seen from the other block's queries
    k = k.expand(B, H, L, D).clone()
    v = torch.randn(B, H, L, D, generator=g)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("backend", _tail_backends())
def test_planted_overshoot_falls_back_to_dropping(backend):
    layout, plan = _two_blocks()
    q, k, v = _overshoot_inputs()
    method = TAIL_METHODS["pooled-var"]
    dropped = _run(q, k, v, plan, backend, None)
    assert (_run(q, k, v, plan, backend, method.fixed()) - dropped).abs().max() > 0.1  # the formula overshoots
    torch.testing.assert_close(_run(q, k, v, plan, backend, method), dropped, rtol=0, atol=1e-3)
    gate = decide_tail(q, k, v, layout, kept_blocks(plan), summarize_reference(k, v, layout, method), 64 ** -0.5)
    assert not bool(((gate[..., 1] > 0) & (gate[..., 0] > float("-inf"))).any())  # never the corrected summary


def _twin_inputs(correlated: bool, B=1, H=1, D=64):
    """The other block's keys spread ±2 on two channels ``2b, 2b + 1`` (block b's queries ``c (e_2b - e_2b+1)
    / √2``): independently (all four sign pairs: the queries see the spread, the corrected summary is right)
    or together (only ``(+, +)`` and ``(-, -)``: the queries see none of it, the mean summary is exact). The
    two have the same key mean, per-channel variance and radius in every block; values are constant per
    block, so only the skipped block's mass is at stake."""
    g = torch.Generator().manual_seed(12)
    L, scale = 32, D ** -0.5
    block = torch.arange(L) // 16
    y = 0.8 + 0.4 * torch.rand(B, H, L, 1, generator=g)  # s |q| a, the keys' spread a = 2 as the queries see it
    across = torch.zeros(2, D)
    for b in range(2):
        across[b, 2 * b], across[b, 2 * b + 1] = 2 ** -0.5, -(2 ** -0.5)
    q = y * across[block] / (scale * 2)
    slot = torch.arange(L) % 16
    first = torch.where(slot % 2 == 0, 1.0, -1.0)
    second = first if correlated else torch.where(slot % 4 < 2, 1.0, -1.0)
    k = torch.zeros(L, D)
    other = 1 - block
    k[torch.arange(L), 2 * other] = 2 * first
    k[torch.arange(L), 2 * other + 1] = 2 * second
    v = torch.randn(2, D, generator=g)[block].expand(B, H, L, D).clone()
    return q.to(DEVICE), k.expand(B, H, L, D).clone().to(DEVICE), v.to(DEVICE)


def test_planted_twins_are_decided_apart():
    """Same summaries, different exact attention: the decision reads the attention, not the statistics."""
    layout, plan = _two_blocks()
    method = TAIL_METHODS["pooled-var"]
    twins = [_twin_inputs(correlated) for correlated in (False, True)]
    summaries = [summarize_reference(k, v, layout, method) for _, k, v in twins]
    for name in ("keys", "key_var", "key_radius"):
        torch.testing.assert_close(getattr(summaries[0], name), getattr(summaries[1], name))
    gates = [decide_tail(q, k, v, layout, kept_blocks(plan), s, 64 ** -0.5) for (q, k, v), s in zip(twins, summaries)]
    assert bool((gates[0][..., 1] == 1).all()) and bool((gates[1][..., 1] == 0).all()), gates  # corrected / mean
    assert bool((gates[0][..., 0] > float("-inf")).all()) and bool((gates[1][..., 0] == 0).all()), gates
    for backend in _tail_backends():
        for q, k, v in twins:  # each call beats dropping and the other twin's choice
            dense = F.scaled_dot_product_attention(q, k, v)
            errors = [(_run(q, k, v, plan, backend, tail) - dense).norm() for tail in (method, None)]
            assert errors[0] < 0.5 * errors[1], (backend, errors)


def test_choose_tail_picks_the_option_the_exact_rows_follow():
    """Per head: exact rows built as the kept partial merged with candidate 1 at w = 1/2, as the kept partial
    alone, and as candidate 0 at w = 1 (the merge written out, not through ``merge_partials``)."""
    g = torch.Generator().manual_seed(13)
    B, H, P, D = 1, 3, 8, 4
    kept_out, kept_lse = torch.randn(B, H, P, D, generator=g), torch.randn(B, H, P, generator=g)
    tail_out, tail_lse = torch.randn(2, B, H, P, D, generator=g), torch.randn(2, B, H, P, generator=g)

    def merged(c, w):
        a, b = kept_lse.exp()[..., None], w * tail_lse[c].exp()[..., None]
        return (a * kept_out + b * tail_out[c]) / (a + b)

    exact = torch.stack([merged(1, 0.5)[:, 0], kept_out[:, 1], merged(0, 1.0)[:, 2]], dim=1)
    choice, log_weight = choose_tail(exact, kept_out, kept_lse, tail_out, tail_lse)
    assert choice.tolist() == [[1, -1, 0]]
    torch.testing.assert_close(log_weight, torch.tensor([[math.log(0.5), float("-inf"), 0.0]]))
    assert 0.5 in TAIL_WEIGHTS
    # a tail with nothing in it for the probe rows (lse -inf) ties with dropping: dropping wins
    choice, log_weight = choose_tail(kept_out, kept_out, kept_lse, torch.zeros_like(tail_out),
                                     torch.full_like(tail_lse, float("-inf")))
    assert (choice == -1).all() and (log_weight == float("-inf")).all()


def test_probe_rows_are_a_fixed_stride_over_the_tile_order():
    layout = _layouts()[2]  # text first, 64-token blocks
    rows, blocks = probe_rows(layout, 32, DEVICE)
    assert rows.numel() == 32 and rows.unique().numel() == 32
    slots = layout.on(DEVICE).inverse_perm[rows]
    assert bool((slots.diff() > 0).all())  # ascending in tile order, evenly spread
    assert torch.equal(blocks, slots // layout.block_size)
    assert blocks.unique().numel() == layout.num_blocks  # every query block is measured here
    rows, _ = probe_rows(layout, 32, DEVICE, lo=100, hi=140)  # a ring chunk's rows, from the chunk's start
    assert bool(((rows >= 0) & (rows < 40)).all()) and rows.numel() == 32
    assert probe_rows(layout, 1000, DEVICE)[0].numel() == layout.num_tokens


def test_ring_ranks_decide_from_their_own_rows():
    """Under a simulated ring each rank decides from its chunk's rows: the planted cases still hold."""
    from sparsevid.parallel.ring import simulate_ring

    layout, plan = _two_blocks()
    q, k, v = _overshoot_inputs()
    dropped = sv.sparse_attention(q, k, v, plan, backend="reference")
    torch.testing.assert_close(simulate_ring(q, k, v, plan, 2, tail="pooled-var", backend="reference")[0], dropped,
                               rtol=0, atol=1e-3)
    for correlated in (False, True):
        q, k, v = _twin_inputs(correlated)
        single = sv.sparse_attention(q, k, v, plan, tail="pooled-var", backend="reference")
        torch.testing.assert_close(simulate_ring(q, k, v, plan, 2, tail="pooled-var", backend="reference")[0],
                                   single, rtol=1e-4, atol=1e-5)


def test_a_tail_method_value_is_checked_and_the_cluster_tail_is_decided_unless_fixed():
    """``probes`` must be an int >= 0; ``"centroid"`` (and ``"auto"`` on a ClusterPlan) is the decided cluster
    tail, its ``fixed()`` copy (probes=0) is kept as given, and either is refused with a BlockPlan."""
    from sparsevid.tail import AUTO, CLUSTER_TAIL, auto_tail, check_tail

    for method in (TAIL_METHODS["pooled-var"], CLUSTER_TAIL):
        assert check_tail(method.fixed()).probes == 0 and check_tail(method).probes == PROBES
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="tail.probes"):
                check_tail(dataclasses.replace(method, probes=bad))
    assert check_tail("centroid") is CLUSTER_TAIL and auto_tail(sv.ClusterPlan) is CLUSTER_TAIL
    assert check_tail(dataclasses.replace(CLUSTER_TAIL, probes=8)).probes == 8
    layout = sv.VideoLayout(2, 4, 4, block_size=16)
    plan = sv.plan(*(torch.randn(1, 1, layout.num_tokens, 16) for _ in range(2)), layout, method="dense")
    with pytest.raises(ValueError, match="Expect a ClusterPlan"):
        check_tail(CLUSTER_TAIL.fixed(), plan)
    assert check_tail(AUTO, plan) is None
