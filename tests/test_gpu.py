"""GPU-only checks (skipped without CUDA): the fa4 backend against the reference and the dense masked
SDPA oracle, under torch.compile; sv.apply on a tiny Wan with fa4 vs reference; no host sync in a
hooked forward; GPU memory flat across apply/remove cycles; the 8-bit kernels (quant=) against their
quantization reference, the accuracy target on clip inputs, compile/capture and apply(quant=)."""

import pytest
import torch
import torch.nn.functional as F

import sparsevid as sv

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs CUDA")
FA4 = CUDA and "fa4" in sv.available_backends("cuda")
needs_fa4 = pytest.mark.skipif(not FA4, reason="fa4 not usable here (flash-attn-4 on Hopper/Blackwell)")


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


LAYOUTS = {
    "ragged+text-last": dict(frames=3, height=30, width=52, text_tokens=77),  # 480p-shaped frames, short last block
    "text-first": dict(frames=2, height=17, width=23, text_tokens=40, text_first=True),
    "exact": dict(frames=2, height=32, width=32),  # L a multiple of 128: no mask block
    "64-blocks": dict(frames=2, height=13, width=21, text_tokens=5, block_size=64),
}


# every layout with head dim 128 and both plan kinds (per-head draft, broadcast (1, 1) window); the
# other head dims on one layout (each new head dim, block size and broadcast pattern compiles a kernel)
FA4_CASES = [(n, 128, m) for n in LAYOUTS for m in ("draft", "window")] + [
    ("ragged+text-last", hd, "draft") for hd in (64, 96)]


@needs_fa4
@pytest.mark.parametrize("name,head_dim,method", FA4_CASES)
def test_fa4_equals_reference_and_oracle(name, head_dim, method):
    layout = sv.VideoLayout(**LAYOUTS[name])
    B, H, L = 2, 3, layout.num_tokens
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, L, H, head_dim, device="cuda", generator=g).bfloat16().transpose(1, 2) for _ in range(3))
    plan = sv.plan(q, k, layout, method=method, density=0.2)
    out = sv.sparse_attention(q, k, v, plan, backend="fa4")
    ref = sv.sparse_attention(q, k, v, plan, backend="reference")
    oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=plan.to_mask())
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, oracle) < 1e-2 and rel_err(out, ref) < 1e-2
    tiled = layout.replace(tiled=True)  # the same tokens already in tile order: no gather
    qt, kt, vt = (layout.to_tiles(t)[:, :, :L] for t in (q, k, v))
    plan_t = sv.plan(qt, kt, tiled, method=method, density=0.2)
    assert torch.equal(plan_t.kv_num_blocks, plan.kv_num_blocks)
    out_t = sv.sparse_attention(qt, kt, vt, plan_t, backend="fa4")
    assert rel_err(layout.from_tiles(out_t), out) < 1e-3


@needs_fa4
def test_fa4_dense_plan_and_compile():
    layout = sv.VideoLayout(frames=2, height=30, width=52, text_tokens=11)
    q, k, v = (torch.randn(1, 4, layout.num_tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense = sv.plan(q, k, layout, method="dense")
    assert rel_err(sv.sparse_attention(q, k, v, dense, backend="fa4"), F.scaled_dot_product_attention(q, k, v)) < 1e-2
    plan = sv.plan(q, k, layout, method="draft", density=0.25)
    eager = sv.sparse_attention(q, k, v, plan, backend="fa4")
    compiled = torch.compile(lambda a, b, c: sv.sparse_attention(a, b, c, plan, backend="fa4"), fullgraph=True)
    assert rel_err(compiled(q, k, v), eager) < 1e-3


def _tiny_wan_cuda():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_wan, wan_inputs

    model = tiny_wan(num_layers=3, heads=2, head_dim=64).to("cuda", torch.bfloat16)
    inputs = {k: (v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
                  v.to("cuda") if torch.is_tensor(v) else v) for k, v in wan_inputs(frames=4, height=16, width=24).items()}
    return model, inputs


@needs_fa4
@pytest.mark.parametrize("tile_order", [False, True])
def test_apply_with_fa4_equals_reference(tile_order):
    pytest.importorskip("diffusers")
    model, inputs = _tiny_wan_cuda()
    outs = {}
    for backend in ("reference", "fa4", "triton"):
        handle = sv.apply(model, method="draft", density=0.25, dense_layers=0, backend=backend, tile_order=tile_order)
        with torch.no_grad():
            outs[backend] = model(**inputs)[0]
        assert handle.stats()["sparse_calls"] == 3
        handle.remove()
    assert rel_err(outs["fa4"], outs["reference"]) < 2e-2 and rel_err(outs["triton"], outs["reference"]) < 2e-2


def _syncs(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy ", "cudaMemcpyAsync")
    return sum(e.count for e in prof.key_averages() if e.key.startswith(names[:2]) or "DtoH" in e.key)


@pytest.mark.parametrize("method, options", [
    ("draft", {}), ("clustered", dict(tail="centroid")), ("clustered", dict(tail="centroid", q_partition="kdtree"))])
def test_a_hooked_forward_adds_no_host_sync(method, options):
    """Replanning every step: planning (k-means with its warm start, the k-d partition), the clustered tail's decision
    and the kernels read nothing back to the host."""
    pytest.importorskip("diffusers")
    model, inputs = _tiny_wan_cuda()

    def forward():
        with torch.no_grad():
            model(**inputs)

    from types import SimpleNamespace

    forward()
    native = _syncs(forward)
    # a pipeline as sparsevid sees it: the scheduler's step index is a host int (no timestep read)
    pipe = SimpleNamespace(transformer=model, scheduler=SimpleNamespace(step_index=5, timesteps=torch.arange(10)))
    handle = sv.apply(pipe, method=method, density=0.25, dense_layers=0, replan_every=1, **options)
    forward()  # first sparse forward: layouts move to the GPU once, kernels compile
    sparse = _syncs(forward)
    assert handle.stats()["sparse_calls"] >= 3
    handle.remove()
    assert sparse <= native, (sparse, native)


@pytest.mark.parametrize("backend", ["triton", pytest.param("fa4", marks=needs_fa4)])
def test_memory_is_flat_across_apply_remove_cycles(backend):
    pytest.importorskip("diffusers")
    model, inputs = _tiny_wan_cuda()
    torch.cuda.synchronize()
    sizes = []
    for cycle in range(4):
        handle = sv.apply(model, method="draft", density=0.25, dense_layers=0, backend=backend)
        with torch.no_grad():
            for t in (900, 800):
                model(**{**inputs, "timestep": torch.full((2,), t, device="cuda")})
        handle.remove()  # frees the device memory at once: no gc pass here (diffusers' hooks sit in cycles)
        torch.cuda.synchronize()
        sizes.append(torch.cuda.memory_allocated())
    assert sizes[-1] <= sizes[1], sizes  # the first cycle may cache layouts and kernels


# ------------------------------------------------------------------------------ 8-bit (quant=)
QUANT = CUDA and "triton-int8" in sv.available_backends("cuda")
FP8 = CUDA and "triton-fp8" in sv.available_backends("cuda")
needs_quant = pytest.mark.skipif(not QUANT, reason="triton-int8 not usable here")
QUANT_CASES = [("ragged+text-last", q, hd) for q in ("int8", "fp8") for hd in (64, 128)] + [
    (n, q, 128) for n in ("text-first", "exact", "64-blocks") for q in ("int8", "fp8")]
QUANT_TWIN = {"int8": 1e-2, "fp8": 4e-2}  # bf16 output rounding + P's running-max rounding (reference_quant)
QUANT_BOUND = {"int8": 0.015, "fp8": 0.06}  # documented bounds vs the exact oracle (random inputs)


@needs_quant
@pytest.mark.parametrize("name,quant,head_dim", QUANT_CASES)
def test_quant_kernel_equals_quant_reference(name, quant, head_dim):
    if quant == "fp8" and not FP8:
        pytest.skip("triton-fp8 needs sm89+")
    layout = sv.VideoLayout(**LAYOUTS[name])
    B, H, L = 2, 3, layout.num_tokens
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, L, H, head_dim, device="cuda", generator=g).bfloat16().transpose(1, 2) for _ in range(3))
    k = k + 4 * torch.randn(head_dim, device="cuda", generator=g).bfloat16()  # shared key offset: smoothing's job
    plan = sv.plan(q, k, layout, method="draft", density=0.2)
    out = sv.sparse_attention(q, k, v, plan, quant=quant)  # auto picks the Triton kernel
    ref = sv.sparse_attention(q, k, v, plan, backend=f"reference-{quant}")
    oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=plan.to_mask())
    assert out.shape == q.shape and out.stride() == q.stride() and torch.isfinite(out).all()
    assert rel_err(out, ref) < QUANT_TWIN[quant], rel_err(out, ref)
    assert rel_err(out, oracle) < QUANT_BOUND[quant], rel_err(out, oracle)


@needs_quant
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_quant_on_clip_inputs_within_target_of_bf16_sparse(quant):
    """Issue 15's accuracy target at a 480p-shaped grid (3 of Wan2.1's 21 latent frames): relative L2
    vs the bf16 sparse output <= 0.03 on real-clip attention inputs at density 0.1."""
    if quant == "fp8" and not FP8:
        pytest.skip("triton-fp8 needs sm89+")
    from sparsevid.lab import data

    layout = sv.VideoLayout(frames=3, height=30, width=52)
    q, k, v = data.attention_inputs(layout=layout, heads=4, head_dim=128, dtype=torch.bfloat16, device="cuda")
    plan = sv.plan(q, k, layout, method="draft", density=0.1)
    exact = sv.sparse_attention(q, k, v, plan, backend="triton")
    out = sv.sparse_attention(q, k, v, plan, quant=quant)
    assert rel_err(out, exact) <= 0.03, rel_err(out, exact)


@needs_quant
def test_quant_compiles_and_captures():
    layout = sv.VideoLayout(frames=2, height=30, width=52, text_tokens=11)
    q, k, v = (torch.randn(1, 4, layout.num_tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plan = sv.plan(q, k, layout, method="draft", density=0.2)
    eager = sv.sparse_attention(q, k, v, plan, quant="int8")
    compiled = torch.compile(lambda a, b, c: sv.sparse_attention(a, b, c, plan, quant="int8"), fullgraph=True)
    assert rel_err(compiled(q, k, v), eager) < 1e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sv.sparse_attention(q, k, v, plan, quant="int8")
    graph.replay()
    assert rel_err(captured, eager) < 1e-3


@needs_quant
def test_apply_quant_int8_tiny_wan():
    model, inputs = _tiny_wan_cuda()
    with torch.no_grad():
        handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, backend="triton",
                          tile=(4, 8), block_size=32)
        exact = model(**inputs)[0]
        handle.remove()
        handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, quant="int8", tile=(4, 8),
                          block_size=32)
        quant = model(**inputs)[0]
        assert handle.stats()["sparse_calls"] > 0
        handle.remove()
    assert 0 < rel_err(quant, exact) < 0.03


# ------------------------------------------------------------------------------------------ tail= (issue 22)
TAIL_BACKENDS = ["triton", pytest.param("fa4", marks=needs_fa4)]


@pytest.mark.parametrize("backend", TAIL_BACKENDS)
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("tail", ["pooled-var", "pooled-var-32"])
def test_tail_backends_equal_reference_bf16(backend, name, tail):
    """bf16 on the GPU (the interpreter's bf16 dot is wrong, so the CPU tests use fp16): the fused Triton
    kernel and FlashAttention-4 + merge against the reference twin, strided inputs, per-head and
    broadcast plans, and the same tokens already in tile order. The summaries taken as they are (``fixed()``):
    the kernels are compared here, the call's decision in test_tail.py and test_tail_compiles_and_captures."""
    from sparsevid.tail import TAIL_METHODS

    tail = TAIL_METHODS[tail].fixed()
    layout = sv.VideoLayout(**LAYOUTS[name])
    B, H, L, D = 2, 3, layout.num_tokens, 128
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", generator=g).bfloat16().transpose(1, 2) for _ in range(3))
    for method in ("draft", "window"):
        plan = sv.plan(q, k, layout, method=method, density=0.2)
        out = sv.sparse_attention(q, k, v, plan, backend=backend, tail=tail)
        ref = sv.sparse_attention(q, k, v, plan, backend="reference", tail=tail)
        plain = sv.sparse_attention(q, k, v, plan, backend=backend)
        assert out.shape == q.shape and torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-2, (method, rel_err(out, ref))
        assert rel_err(out, plain) > 1e-2  # the tail really ran
    tiled = layout.replace(tiled=True)
    qt, kt, vt = (layout.to_tiles(t)[:, :, :L] for t in (q, k, v))
    plan_t = sv.plan(qt, kt, tiled, method="draft", density=0.2)
    out_t = sv.sparse_attention(qt, kt, vt, plan_t, backend=backend, tail=tail)
    ref = sv.sparse_attention(q, k, v, sv.plan(q, k, layout, method="draft", density=0.2), backend="reference",
                              tail=tail)
    assert rel_err(layout.from_tiles(out_t), ref) < 1e-2


@pytest.mark.parametrize("backend", TAIL_BACKENDS)
def test_tail_compiles_and_captures(backend):
    layout = sv.VideoLayout(frames=2, height=30, width=52)
    q, k, v = (torch.randn(1, 4, layout.num_tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plan = sv.plan(q, k, layout, method="draft", density=0.2)
    eager = sv.sparse_attention(q, k, v, plan, backend=backend, tail="pooled-var")
    compiled = torch.compile(lambda a, b, c: sv.sparse_attention(a, b, c, plan, backend=backend, tail="pooled-var"),
                             fullgraph=True)
    assert rel_err(compiled(q, k, v), eager) < 1e-3
    static = torch.empty_like(eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static.copy_(sv.sparse_attention(q, k, v, plan, backend=backend, tail="pooled-var"))
    graph.replay()
    assert rel_err(static, eager) < 1e-3


@pytest.mark.parametrize("tile_order", [False, True])
def test_apply_with_tail_on_every_backend(tile_order):
    pytest.importorskip("diffusers")
    model, inputs = _tiny_wan_cuda()
    outs = {}
    for backend in ["reference", "triton"] + (["fa4"] if FA4 else []):
        for tail in (None, "pooled-var"):
            handle = sv.apply(model, method="draft", density=0.25, dense_layers=0, backend=backend,
                              tile_order=tile_order, tail=tail)
            with torch.no_grad():
                outs[backend, tail] = model(**inputs)[0]
            assert handle.stats()["sparse_calls"] == 3
            handle.remove()
    for backend in ["triton"] + (["fa4"] if FA4 else []):
        assert rel_err(outs[backend, "pooled-var"], outs["reference", "pooled-var"]) < 2e-2
    assert rel_err(outs["reference", "pooled-var"], outs["reference", None]) > 1e-3
