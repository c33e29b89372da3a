"""The backend registry: declared capabilities honoured before any launch, ``auto`` never picks an
unusable backend; every backend gives the same result (Triton under the interpreter on the CPU)."""

import pytest
import torch
import torch.nn.functional as F

import sparsevid as sv
from sparsevid.backends import resolve_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)
LAYOUT = sv.VideoLayout(frames=2, height=5, width=7, text_tokens=9, text_first=True, tile=(4, 4), block_size=16)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method", ["window", "draft"])  # broadcast (1, 1) and per-head plans
def test_triton_backend_equals_oracle(method):
    pytest.importorskip("triton")
    B, H, L, D = 2, 2, LAYOUT.num_tokens, 64
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE).half().transpose(1, 2) for _ in range(3))  # strided view
    plan = sv.plan(q, k, LAYOUT, method=method, density=0.3)
    out = sv.sparse_attention(q, k, v, plan, backend="triton")
    oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=plan.to_mask())
    assert out.device == q.device
    assert out.shape == (B, H, L, D) and out.dtype == torch.float16
    assert rel_err(out, oracle) < 2e-3
    assert rel_err(out, sv.sparse_attention(q, k, v, plan, backend="reference")) < 2e-3


def test_available_and_described_backends_on_cpu():
    assert {"reference", "flex"} <= set(sv.available_backends("cpu"))
    rows = {d["name"]: d for d in sv.describe_backends("cpu")}
    assert {"reference", "flex", "triton", "fa4"} <= set(rows)
    assert rows["fa4"]["usable"] is False and rows["fa4"]["reason"]  # says why
    assert rows["fa4"]["plans"] == ["BlockPlan"] and rows["fa4"]["gpu_majors"] == [9, 10]


def test_fa4_on_the_cpu_is_a_clear_error():
    q = torch.randn(1, 2, LAYOUT.num_tokens, 64, dtype=torch.bfloat16)
    plan = sv.plan(q, q, LAYOUT, method="dense")
    with pytest.raises(ValueError, match="backend 'fa4'"):
        sv.sparse_attention(q, q, q, plan, backend="fa4")


def _inputs(dtype=torch.float16, D=64, device="cpu", requires_grad=False):
    q = torch.randn(1, 2, LAYOUT.num_tokens, D, dtype=dtype, device=device, requires_grad=requires_grad)
    return q, sv.plan(q.detach(), q.detach(), LAYOUT, method="draft", density=0.3)


@pytest.mark.parametrize("backend", ["reference", "flex", "triton", "fa4"])
def test_capabilities_are_checked_before_launch_with_one_error_type(backend):
    """Each backend refuses what its registration does not declare, with the same exception type."""
    spec = {d["name"]: d for d in sv.describe_backends(DEVICE)}[backend]
    q, plan = _inputs()
    token_q = torch.randn(1, 2, LAYOUT.num_tokens, 64, device=DEVICE)
    token_plan = sv.plan(token_q, token_q, LAYOUT, method="finegrained", density=0.3)
    cases = [(token_q, token_plan)] if spec["plans"] == ["BlockPlan"] else []
    for q_case, p_case in cases:
        with pytest.raises((TypeError, ValueError)) as error:  # not usable here (ValueError) or wrong plan type
            sv.sparse_attention(q_case, q_case, q_case, p_case, backend=backend)
        if spec["usable"]:
            assert error.type is TypeError and "BlockPlan" in str(error.value)
    if spec["usable"] and "float32" not in spec["dtypes"]:
        q32 = torch.randn(1, 2, LAYOUT.num_tokens, 64, device=DEVICE)
        with pytest.raises(TypeError, match=f"backend '{backend}'"):
            sv.sparse_attention(q32, q32, q32, plan.to(DEVICE), backend=backend)
    if spec["usable"] and spec["head_dims"] != "any":
        q16 = torch.randn(1, 2, LAYOUT.num_tokens, 16, dtype=torch.float16, device=DEVICE)
        with pytest.raises(ValueError, match="head_dim"):
            sv.sparse_attention(q16, q16, q16, plan.to(DEVICE), backend=backend)
    if not spec["usable"]:
        with pytest.raises(ValueError, match=f"backend '{backend}'"):
            sv.sparse_attention(q, q, q, plan, backend=backend)


def test_auto_never_picks_an_unusable_backend():
    for dtype, grad in ((torch.float32, False), (torch.float16, False), (torch.float32, True)):
        q, plan = _inputs(dtype, requires_grad=grad)
        chosen = resolve_backend("auto", q, plan).name
        assert chosen in sv.available_backends(q.device)
        assert chosen == "reference"  # CPU: the reference; inputs that need grad: the reference everywhere


def test_unknown_backend_lists_the_registered_ones():
    q, plan = _inputs()
    with pytest.raises(ValueError, match="reference.*fa4|fa4.*reference"):
        sv.sparse_attention(q, q, q, plan, backend="bogus")


def test_a_registered_backend_is_used_by_name_and_by_auto():
    from sparsevid.backends import _REGISTRY

    calls = []

    @sv.register_backend("test-double", plans=(sv.BlockPlan,), devices=("cpu",), priority=1000, auto_devices=("cpu",),
                         backward=True, description="counts calls, then runs the reference")
    def double(q, k, v, plan, scale):
        calls.append(plan.method)
        return _REGISTRY["reference"].fn(q, k, v, plan, scale)

    try:
        q, plan = _inputs(torch.float32)
        sv.sparse_attention(q, q, q, plan)
        sv.sparse_attention(q, q, q, plan, backend="test-double")
        assert calls == ["draft", "draft"]
        with pytest.raises(ValueError, match="already registered"):
            sv.register_backend("reference", plans=(sv.BlockPlan,), devices=("cpu",))(double)
    finally:
        _REGISTRY.pop("test-double")


def test_the_cpu_path_needs_no_triton():
    """Registering the backends imports no Triton (the CPU torch wheel brings none): planning and the reference
    backend, with a tail, run where ``import triton`` fails."""
    import subprocess
    import sys

    code = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'triton':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import torch, sparsevid as sv\n"
        "lay = sv.VideoLayout(2, 8, 8, block_size=32)\n"
        "q = torch.randn(1, 2, lay.num_tokens, 16)\n"
        "p = sv.plan(q, q, lay, method='draft', density=0.3)\n"
        "assert sv.sparse_attention(q, q, q, p, tail='pooled-var').shape == q.shape\n"
        "assert sv.sparse_attention(q, q, q, p).shape == q.shape\n"
        "assert 'triton' not in sys.modules\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_describe_backends_on_a_missing_cuda_device_says_why():
    """Defect (issue 23): on CPU torch the capability check called into CUDA and raised."""
    missing = f"cuda:{torch.cuda.device_count() + 1}"  # past the GPUs here, whatever the machine
    rows = sv.describe_backends(missing)
    assert rows and not any(r["usable"] for r in rows if "cuda" in r["devices"])
    assert all(r["reason"] for r in rows)  # not installed, or the device is missing
    assert f"there is no {missing} here" in {r["name"]: r for r in rows}["reference"]["reason"]
    assert sv.available_backends(missing) == []
    if not torch.cuda.is_available():
        assert "reference" not in sv.available_backends("cuda")
    with pytest.raises(ValueError, match="Expect device to be a torch device"):
        sv.describe_backends("foo")


def test_triton_refuses_block_sizes_its_kernels_cannot_tile():
    """Defect (issue 23): block_size 48 passed the layout and failed inside the kernel (tl.arange)."""
    pytest.importorskip("triton")
    layout = sv.VideoLayout(2, 4, 8, tile=(4, 8), block_size=48)
    q = torch.randn(1, 2, layout.num_tokens, 64, dtype=torch.float16, device=DEVICE)
    for method in ("draft", "finegrained"):  # both kernels
        plan = sv.plan(q, q, layout, method=method, density=0.5)
        with pytest.raises(ValueError, match=r"block_size in \(16, 32, 64, 128\) for backend 'triton' but got 48"):
            sv.sparse_attention(q, q, q, plan, backend="triton")
        assert resolve_backend("auto", q, plan).name != "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter's limit (CPU)")
def test_triton_refuses_bfloat16_under_the_interpreter():
    """Defect (issue 23): the interpreter's bfloat16 gave errors of 8e8, and the backend accepted it."""
    pytest.importorskip("triton")
    q, plan = _inputs(torch.bfloat16)
    with pytest.raises(TypeError, match="TRITON_INTERPRET=1"):
        sv.sparse_attention(q, q, q, plan, backend="triton")
    assert {d["name"]: d for d in sv.describe_backends("cpu")}["triton"]["dtypes"] == ["float16"]


def test_flex_declares_its_backward_on_cuda_only():
    """Defect (issue 23): flex declared a CPU backward and failed in FlexAttention at launch."""
    q, plan = _inputs(torch.float32, requires_grad=True)
    with pytest.raises(ValueError, match="backend 'flex' on cpu .*backward runs on cuda only"):
        sv.sparse_attention(q, q, q, plan, backend="flex")
    with torch.no_grad():
        sv.sparse_attention(q, q, q, plan, backend="flex")
    assert {d["name"]: d["backward"] for d in sv.describe_backends()}["flex"] == ["cuda"]
