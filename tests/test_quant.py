"""8-bit attention (``quant="int8"`` / ``"fp8"``): the quantization reference against the exact oracle,
the Triton pre-pass and kernel against the reference (CPU: under the Triton interpreter, which runs
int8 and e4m3 ``tl.dot`` exactly; the kernel rounds to the e4m3 grid by hand there, see
``triton_quant._to_e4m3``), the ``quant=`` argument's refusals, ``auto``'s choice, and
``sparsevid.apply(quant=...)``. GPU-only checks (the compiled kernel, speed-relevant shapes) live in
tests/test_gpu.py."""

import pytest
import torch

import sparsevid as sv
from sparsevid import backends
from sparsevid.kernels.reference_quant import quantize_blocks, sparse_attention_quant_reference

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(layout, B, H, D, dtype=torch.float16, seed=0, key_offset=2.0, transposed=False, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    L = layout.num_tokens
    shape = (B, L, H, D) if transposed else (B, H, L, D)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    k = k + key_offset * torch.randn(D, generator=g)  # a channel offset shared by every key (what smoothing removes)
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    if transposed:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return q, k, v


def oracle(q, k, v, plan):
    mask = plan.to_mask().expand(q.shape[0], q.shape[1], -1, -1)
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)


# ragged grid (5 x 7 tokens per frame in 4 x 4 / 4 x 8 tiles: short edge tiles) with text tokens
def ragged(block_size, text=5):
    tile = (4, 4) if block_size == 16 else (4, 8)
    return sv.VideoLayout(frames=2, height=5, width=7, text_tokens=text, tile=tile, block_size=block_size)


# ------------------------------------------------------------------------------ reference vs oracle
# The documented bounds (reference_quant's docstring): relative L2 vs the exact oracle.
BOUND = {"int8": 0.015, "fp8": 0.06}


@pytest.mark.parametrize("quant", ["int8", "fp8"])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_error_vs_oracle_is_bounded(quant, seed):
    layout = ragged(32)
    q, k, v = inputs(layout, 2, 2, 64, dtype=torch.float32, seed=seed, key_offset=8.0)
    plan = sv.plan(q, k, layout, method="random", density=0.5, seed=seed)
    out = sparse_attention_quant_reference(q, k, v, plan.perm, plan.kv_num_blocks, plan.kv_indices,
                                           plan.block_size, q.shape[-1] ** -0.5, quant)
    err = rel(out, oracle(q, k, v, plan))
    assert 1e-4 < err <= BOUND[quant], err  # quantized (not exact), within the documented bound


def test_key_smoothing_is_what_keeps_int8_accurate():
    """Without the mean subtraction a large shared key offset uses up the 8-bit range."""
    layout = ragged(16)
    q, k, v = inputs(layout, 1, 2, 64, dtype=torch.float32, key_offset=30.0, device="cpu")  # the reference
    plan = sv.plan(q, k, layout, method="dense")
    codes, scales = quantize_blocks(k, plan.perm, 16, "int8")  # no shift: the raw keys
    smoothed, _ = quantize_blocks(k, plan.perm, 16, "int8", shift=k.mean(dim=2, dtype=torch.float32))
    # raw: the offset dominates, the per-key part lands on few codes; smoothed: spread over the range
    assert smoothed.float().std() > 3 * codes.float().sub(codes.float().mean(dim=2, keepdim=True)).std()
    out = sv.sparse_attention(q, k, v, plan, quant="int8")
    assert rel(out, oracle(q, k, v, plan)) <= BOUND["int8"]


def test_reference_codes_round_as_documented():
    layout = sv.VideoLayout(frames=1, height=4, width=4, tile=(4, 4), block_size=16)
    x = torch.zeros(1, 1, 16, 2)
    x[0, 0, :, 0] = torch.linspace(-1, 1, 16)
    x[0, 0, 0, 1] = 2.0  # the block's absmax: scale 2 / 127
    codes, scales = quantize_blocks(x, layout.perm, 16, "int8")
    assert scales.item() == pytest.approx(2.0 / 127)
    expected = torch.trunc(x[0, 0, :, 0] * (127 / 2.0) + torch.where(x[0, 0, :, 0] >= 0, 0.5, -0.5))
    assert torch.equal(codes[0, 0, layout.inverse_perm, 0].float(), expected)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127


# ------------------------------------------------------------------------------ Triton vs reference
CASES = [  # quant, head dim, block size, dtype, transposed (B, L, H, D) memory, per-head plan
    ("int8", 64, 16, torch.float16, False),
    ("int8", 128, 16, torch.bfloat16, True),
    ("fp8", 64, 32, torch.float16, False),
    ("fp8", 128, 32, torch.bfloat16, True),
]
TWIN_TOL = {"int8": 2e-3, "fp8": 3e-2}  # P relative to the running vs the final row max (see reference_quant)


@pytest.mark.parametrize("quant,D,block_size,dtype,transposed", CASES)
def test_triton_kernel_equals_quant_reference(quant, D, block_size, dtype, transposed):
    layout = ragged(block_size)
    q, k, v = inputs(layout, 2, 2, D, dtype=dtype, transposed=transposed)
    plan = sv.plan(q, k, layout, method="random", density=0.4, seed=1)  # per batch and head
    assert plan.shape == (2, 2)
    out = sv.sparse_attention(q, k, v, plan, backend=f"triton-{quant}")
    ref = sv.sparse_attention(q, k, v, plan, backend=f"reference-{quant}")
    assert out.dtype == dtype and out.stride() == q.stride()
    output_rounding = 8e-3 if dtype == torch.bfloat16 else 0.0  # one bf16 ulp apart is ~0.4% per element
    assert rel(out, ref) <= TWIN_TOL[quant] + output_rounding
    assert rel(out, oracle(q, k, v, plan)) <= BOUND[quant]


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_triton_prepass_codes_equal_reference(quant):
    from sparsevid.kernels.triton_quant import quantize_triton

    layout = ragged(32)
    q, k, v = inputs(layout, 2, 2, 64)
    B, H, L, D = q.shape
    qc, kc, vc, sq, sk, _ = quantize_triton(q, k, v, layout.perm.to(DEVICE), 32, quant)
    rq, rsq = quantize_blocks(q, layout.perm.to(DEVICE), 32, quant)
    rk, rsk = quantize_blocks(k, layout.perm.to(DEVICE), 32, quant, shift=k.mean(dim=2, dtype=torch.float32))
    torch.testing.assert_close(sq.view(B, H, -1), rsq)
    torch.testing.assert_close(sk.view(B, H, -1), rsk)
    for got, want in ((qc, rq), (kc, rk)):
        diff = got.float().view(want.shape) != want.float()
        # equal codes, but for the rare exact rounding tie where the kernel's float32 product of the
        # fp16 input and QMAX / amax lands on the other side (one code step)
        assert diff.float().mean() < 1e-3


def test_broadcast_plan_and_full_plan():
    layout = ragged(16, text=0)
    q, k, v = inputs(layout, 2, 2, 64)
    plan = sv.plan(q[:1, :1], k[:1, :1], layout, method="random", density=0.3, seed=0)  # (1, 1): broadcast
    ref = sv.sparse_attention(q, k, v, plan, backend="reference-int8")
    assert rel(sv.sparse_attention(q, k, v, plan, backend="triton-int8"), ref) <= TWIN_TOL["int8"]
    full = sv.plan(q, k, layout, method="dense")
    out = sv.sparse_attention(q, k, v, full, backend="triton-int8")
    assert rel(out, oracle(q, k, v, full)) <= BOUND["int8"]


# ------------------------------------------------------------------------------ the quant= argument
def small():  # CPU tensors: the checks and auto's choice there (CUDA's is in tests/test_gpu.py)
    layout = ragged(16)
    q, k, v = inputs(layout, 1, 2, 64, dtype=torch.float32, device="cpu")
    return q, k, v, sv.plan(q, k, layout, method="random", density=0.5, seed=0)


@pytest.mark.parametrize("bad", ["int4", "INT8", "", 8, True, "fp16"])
def test_bad_quant_values_are_refused_naming_quant(bad):
    q, k, v, plan = small()
    with pytest.raises(ValueError, match="quant"):
        sv.sparse_attention(q, k, v, plan, quant=bad)


def test_quant_refuses_inputs_that_require_grad():
    q, k, v, plan = small()
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="forward only"):
        sv.sparse_attention(q, k, v, plan, quant="int8")
    with torch.no_grad():
        sv.sparse_attention(q, k, v, plan, quant="int8")  # no grad needed: fine


def test_auto_picks_a_quantized_backend_only_when_asked():
    q, k, v, plan = small()
    assert backends.resolve_backend("auto", q, plan).quant is None
    assert backends.resolve_backend("auto", q, plan, quant="int8").name == "reference-int8"
    assert backends.resolve_backend("auto", q, plan, quant="fp8").name == "reference-fp8"
    torch.testing.assert_close(sv.sparse_attention(q, k, v, plan), sv.sparse_attention(q, k, v, plan,
                                                                                      backend="reference"))


def test_a_named_backend_must_compute_the_quant_asked():
    q, k, v, plan = small()
    with pytest.raises(ValueError, match="quant='int8'"):
        sv.sparse_attention(q, k, v, plan, backend="reference", quant="int8")
    with pytest.raises(ValueError, match="quant='fp8'"):
        sv.sparse_attention(q, k, v, plan, backend="reference-int8", quant="fp8")
    # quant=None with a named quantized backend runs it (its name says what it computes)
    torch.testing.assert_close(sv.sparse_attention(q, k, v, plan, backend="reference-int8"),
                               sv.sparse_attention(q, k, v, plan, quant="int8"))


def test_fp8_below_sm89_is_refused_clearly(monkeypatch):
    """No GPU needed: the registry reads the compute capability from its cache."""
    device = torch.device("cuda", 0)
    monkeypatch.setitem(backends._CAPABILITY, device, (8, 0))
    fp8, int8 = backends.backend_spec("triton-fp8"), backends.backend_spec("triton-int8")
    if fp8.installed() is not None:
        pytest.skip(fp8.installed())
    reason = fp8.unusable(device)
    assert reason is not None and ">= 8.9" in reason and "8.0" in reason
    assert int8.unusable(device) is None  # int8 runs on Ampere
    from sparsevid.config import SparseVidConfig

    with pytest.raises(ValueError, match=r"quant='fp8'.*8\.9"):
        SparseVidConfig("draft", 0.2, quant="fp8").validate(has_schedule=False, device=device)
    SparseVidConfig("draft", 0.2, quant="int8").validate(has_schedule=False, device=device)
    monkeypatch.setitem(backends._CAPABILITY, device, (9, 0))
    assert fp8.unusable(device) is None


def test_describe_backends_lists_the_quantized_ones():
    rows = {d["name"]: d for d in sv.describe_backends("cpu")}
    assert rows["triton-int8"]["quant"] == "int8" and rows["triton-fp8"]["min_capability"] == "8.9"
    assert rows["reference-int8"]["usable"] and rows["reference"]["quant"] is None


# ------------------------------------------------------------------------------ sparsevid.apply(quant=)
def test_apply_quant_validates_and_runs():
    pytest.importorskip("diffusers")
    from tiny_models import tiny_wan, wan_inputs

    model, x = tiny_wan(head_dim=64), wan_inputs()
    tiling = dict(tile=(2, 4), block_size=16)
    for bad in ("int4", 8):
        with pytest.raises(ValueError, match="quant"):
            sv.apply(model, method="draft", density=0.3, quant=bad, **tiling)
    with pytest.raises(ValueError, match="quant"):
        sv.apply(model, method=None, quant="int8")
    with pytest.raises(ValueError, match="quant='int8'"):
        sv.apply(model, method="draft", density=0.3, backend="reference", quant="int8", **tiling)
    with pytest.raises(TypeError, match="quant"):
        sv.apply(model, method="finegrained", density=0.3, quant="int8", **tiling)

    with torch.no_grad():
        native = model(**x)[0]
        handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, **tiling)
        exact = model(**x)[0]
        handle.remove()
        handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, quant="int8", **tiling)
        quant = model(**x)[0]
        assert handle.stats()["sparse_calls"] == 2
        handle.remove()
        # quantized dense attention: a full plan through the 8-bit path, every layer
        handle = sv.apply(model, method="dense", dense_layers=0, quant="int8", **tiling)
        dense_q = model(**x)[0]
        handle.remove()
        torch.testing.assert_close(model(**x)[0], native)  # exactly native again
    assert 0 < rel(quant, exact) < 0.02
    assert 0 < rel(dense_q, native) < 0.02


def test_the_8bit_variants_come_from_one_registration_helper():
    """One helper registers a family's int8 and fp8 backends: shared options once, each mode's own beside them."""
    from sparsevid.backends import _REGISTRY, register_quant_backends

    seen = []
    register_quant_backends("test-family", lambda q, k, v, plan, scale, quant: seen.append(quant) or q,
                            plans=(sv.BlockPlan,), devices=("cpu",), int8=dict(description="i"),
                            fp8=dict(description="f", min_capability=(8, 9)))
    try:
        int8, fp8 = backends.backend_spec("test-family-int8"), backends.backend_spec("test-family-fp8")
        assert (int8.quant, fp8.quant, int8.description, fp8.min_capability) == ("int8", "fp8", "i", (8, 9))
        q, k, v, plan = small()
        sv.sparse_attention(q, k, v, plan, backend="test-family-fp8")
        sv.sparse_attention(q, k, v, plan, backend="test-family-int8")
        assert seen == ["fp8", "int8"]
    finally:
        _REGISTRY.pop("test-family-int8"), _REGISTRY.pop("test-family-fp8")
    rows = {d["name"]: d for d in sv.describe_backends("cpu")}
    for family in ("triton", "reference"):  # the built-in pairs differ only where their modes differ
        a, b = rows[f"{family}-int8"], rows[f"{family}-fp8"]
        assert {key for key in a if a[key] != b[key]} <= {"name", "quant", "description", "block_sizes",
                                                          "min_capability", "usable", "reason"}
