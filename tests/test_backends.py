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


# ------------------------------------------------------------------------------ settings checked from metadata
RING = sv.VideoLayout(2, 4, 8, tile=(2, 4), block_size=16)  # 64 tokens: two equal ring chunks


def _call_error(fn):
    with pytest.raises((TypeError, ValueError, NotImplementedError)) as error:
        fn()
    return error.type, str(error.value)


@pytest.mark.parametrize("case", ["block48", "head16", "float32", "flex-tail", "fa4-cpu", "int8-token", "ring-flex"])
def test_check_settings_refuses_what_the_call_refuses(case):
    """Defect F3: apply time asks the registry with metadata alone and gets the call's own error."""
    pytest.importorskip("triton")
    from sparsevid.backends import check_settings
    from sparsevid.parallel.ring import simulate_ring

    layout = {"block48": sv.VideoLayout(2, 4, 8, tile=(4, 8), block_size=48), "ring-flex": RING}.get(case, LAYOUT)
    dtype = torch.float32 if case in ("float32", "flex-tail", "ring-flex") else torch.float16
    D = 16 if case == "head16" else 64
    q = torch.randn(1, 2, layout.num_tokens, D, dtype=dtype)
    plan = sv.plan(q, q, layout, method="finegrained" if case == "int8-token" else "draft", density=0.5)
    backend, tail, quant = {"flex-tail": ("flex", "pooled-var", None), "fa4-cpu": ("fa4", None, None),
                            "int8-token": ("auto", None, "int8"), "ring-flex": ("flex", None, None)
                            }.get(case, ("triton", None, None))
    if case == "ring-flex":
        call = _call_error(lambda: simulate_ring(q, q, q, plan, 2, backend=backend))
    else:
        call = _call_error(lambda: sv.sparse_attention(q, q, q, plan, backend=backend, tail=tail, quant=quant))
    settings = _call_error(lambda: check_settings(
        backend, device=q.device, dtype=q.dtype, head_dim=D, block_size=layout.block_size, plan_type=type(plan),
        tail=tail, quant=quant, ring=case == "ring-flex"))
    assert settings == call


def test_check_settings_skips_what_is_not_known_and_auto_always_runs_exact_attention():
    pytest.importorskip("triton")
    from sparsevid.backends import check_settings

    assert check_settings("triton", block_size=64).name == "triton"  # no device: where it runs is not asked
    with pytest.raises(ValueError, match="block_size in"):
        check_settings("triton", block_size=48)
    assert check_settings("auto", device="cpu", block_size=48).name == "reference"
    assert check_settings("auto") is None  # no device: auto's choice waits for the model
    with pytest.raises(ValueError, match="needs among"):
        resolve_backend("auto", *_inputs(), needs=("bogus",))


def test_check_settings_refuses_fa4_block_sizes_and_head_dims_from_metadata(monkeypatch):
    """Defect F3 for fa4 (no GPU needed: the registry reads installation and compute capability from its caches)."""
    from sparsevid import backends
    from sparsevid.backends import check_settings

    device = torch.device("cuda", 0)
    monkeypatch.setitem(backends._INSTALLED, "fa4", None)
    monkeypatch.setitem(backends._CAPABILITY, device, (9, 0))
    assert check_settings("fa4", device=device, block_size=128, head_dim=128).name == "fa4"
    for block_size in (16, 32):
        with pytest.raises(ValueError, match=rf"block_size in \(64, 128\) for backend 'fa4' but got {block_size}"):
            check_settings("fa4", device=device, block_size=block_size)
    with pytest.raises(ValueError, match=r"head_dim in \(64, 96, 128\) for backend 'fa4' but got 32"):
        check_settings("fa4", device=device, head_dim=32)
    with pytest.raises(TypeError, match="for backend 'fa4' but got torch.float32"):
        check_settings("fa4", device=device, dtype=torch.float32)


def test_apply_refuses_a_block_size_the_named_backend_cannot_tile():
    """Defect F3: sv.apply(backend='triton', block_size=48) was accepted and failed at the first sparse step."""
    pytest.importorskip("triton")
    pytest.importorskip("diffusers")
    from tiny_models import tiny_wan

    model = tiny_wan(num_layers=2, heads=1, head_dim=64).half().to(DEVICE)  # elsewhere the device is refused first
    with pytest.raises(ValueError, match=r"block_size in \(16, 32, 64, 128\) for backend 'triton' but got 48"):
        sv.apply(model, method="draft", density=0.3, backend="triton", tile=(2, 4), block_size=48)
    with pytest.raises(ValueError, match=r"block_size in \(64, 128\) for backend 'fa4' but got 32|backend 'fa4'"):
        sv.apply(model, method="draft", density=0.3, backend="fa4", block_size=32)
    assert not getattr(model, "_diffusers_hook", None) or not model._diffusers_hook.hooks
    sv.apply(model, method="draft", density=0.3, backend="auto", tile=(2, 4), block_size=48).remove()


# ------------------------------------------------------------------------------ one registry for every caller
def test_a_registered_ring_step_runs_the_ring_and_its_summary_builder_the_tail():
    """No caller branches on a backend's name: a new registration with a ring step and a summary builder is what
    auto picks for the ring steps, and its builder makes the tail's summaries."""
    from sparsevid.backends import _REGISTRY
    from sparsevid.kernels.reference import _ring_step
    from sparsevid.parallel.ring import ring_backend, simulate_ring
    from sparsevid.tail import TAIL_METHODS, summarize_reference

    calls = []

    def summarize(k, v, layout, method):
        calls.append("summarize")
        return summarize_reference(k, v, layout, method)

    def step(*args, **kwargs):
        calls.append("step")
        return _ring_step(*args, **kwargs)

    sv.register_backend("test-ring", plans=(sv.BlockPlan,), devices=("cpu",), priority=1000, auto_devices=("cpu",),
                        summarize=summarize, ring_step=step)(_REGISTRY["reference"].fn)
    try:
        import sparsevid.parallel.ring as ring

        assert "test-ring" in ring.RING_BACKENDS and "fa4" not in ring.RING_BACKENDS
        q = torch.randn(1, 2, RING.num_tokens, 16)
        plan = sv.plan(q, q, RING, method="draft", density=0.3)
        assert ring_backend("auto", q, plan) == "test-ring"
        fixed = TAIL_METHODS["pooled-var"].fixed()  # as it is: with the call's decision each rank decides alone
        out, _ = simulate_ring(q, q, q, plan, 2, tail=fixed)
        assert calls.count("summarize") == 2 and calls.count("step") >= 2  # one summary pass per rank
        torch.testing.assert_close(out, sv.sparse_attention(q, q, q, plan, tail=fixed, backend="reference"))
    finally:
        _REGISTRY.pop("test-ring")
    assert {d["name"]: d["ring"] for d in sv.describe_backends()} == {
        "reference": True, "flex": False, "triton": True, "fa4": False, "triton-int8": False, "triton-fp8": False,
        "reference-int8": False, "reference-fp8": False}


# ------------------------------------------------------------------------------ launch structs and trust
def test_launch_structs_are_built_once_per_plan_type_and_checked():
    from sparsevid.kernels.triton_backend import BlockLaunch

    q, plan = _inputs()
    first = plan.launch(BlockLaunch, 1, 2)
    assert plan.launch(BlockLaunch, 1, 2) is first and plan.launch(BlockLaunch, 2, 2) is not first
    assert first.kv_num_blocks.shape == (1, 2, LAYOUT.num_blocks) and first.block_size == LAYOUT.block_size
    token = sv.plan(q, q, LAYOUT, method="finegrained", density=0.3)
    with pytest.raises(TypeError, match="BlockLaunch"):
        token.launch(BlockLaunch, 1, 2)
    wide = sv.VideoLayout(2, 4, 8, tile=(4, 8), block_size=48)
    q48 = torch.randn(1, 1, wide.num_tokens, 64)
    with pytest.raises(ValueError, match="block_size in"):
        sv.plan(q48, q48, wide, method="dense").launch(BlockLaunch, 1, 1)


def test_a_planners_plan_is_trusted_at_construction_a_hand_built_one_validated_once(monkeypatch):
    q, plan = _inputs(torch.float32)
    checked = []
    original = sv.BlockPlan.validate

    def validate(self):
        checked.append(self.method)
        return original(self)

    monkeypatch.setattr(sv.BlockPlan, "validate", validate)
    planned = sv.plan(q, q, LAYOUT, method="draft", density=0.3, validate=False)
    sv.sparse_attention(q, q, q, planned)
    assert checked == []  # valid by construction: never read on the host
    by_hand = sv.BlockPlan(LAYOUT, plan.kv_num_blocks, plan.kv_indices)
    sv.sparse_attention(q, q, q, by_hand)
    sv.sparse_attention(q, q, q, by_hand)
    assert checked == ["custom"]  # once
    assert sv.BlockPlan(LAYOUT, plan.kv_num_blocks, plan.kv_indices, trusted=True)[0]._trusted


# ------------------------------------------------------------------------------ every launch checks what it tiles
class _NoLaunch:
    """Stands in for a Triton kernel: any launch fails the test (the check must come before)."""

    def __getitem__(self, grid):
        raise AssertionError("launched a kernel that cannot tile these sizes")

    fn = property(lambda self: self)


def _refused_before_launch(monkeypatch, module, kernel, call, match):
    monkeypatch.setattr(module, kernel, _NoLaunch())
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_every_triton_launcher_checks_its_tiles_before_launching(monkeypatch):
    """Defect F11: a block size the pooling kernel could not tile ran it and read out of bounds (on an H100 an
    illegal memory access that failed every later GPU test of the process)."""
    pytest.importorskip("triton")
    from sparsevid.decoder import triton_mlp
    from sparsevid.kernels import triton_blocksparse, triton_csr, triton_gather, triton_pool, triton_quant, triton_tail

    x = torch.randn(1, 2, 96, 64, dtype=torch.float16)
    perm = torch.arange(96)
    counts, indices = torch.ones(1, 2, 2, dtype=torch.int32), torch.zeros(1, 2, 2, 1, dtype=torch.int32)
    cases = [
        (triton_pool, "_pool_blocks", lambda: triton_pool.pool_blocks_triton(x, perm[:40], torch.full((2,), 20), 20),
         "multiple of 16"),
        (triton_blocksparse, "_sparse_attn_fwd", lambda: triton_blocksparse.sparse_attention_triton(
            x, x, x, perm, counts, indices, 48, 0.1), r"block_size in \(16, 32, 64, 128\)"),
        (triton_blocksparse, "_sparse_attn_fwd", lambda: triton_blocksparse.sparse_attention_triton(
            x.expand(-1, -1, -1, 64).repeat(1, 1, 1, 5), x, x, perm, counts, indices, 32, 0.1), "head_dim"),
        (triton_gather, "_gather_attn_fwd", lambda: triton_gather.token_attention_triton(
            x, x, x, perm, counts, indices, 48, 0.1), "block_size in"),
        (triton_tail, "_summarize", lambda: triton_tail.tail_summaries(x, x, perm, 24), "multiple of 16"),
        (triton_tail, "_tail_merge", lambda: triton_tail.tail_merge(
            x, x.float(), x[..., 0].float(), perm, *(x,) * 4, x[0, 0, :2, 0].float(),
            torch.ones(1, 2, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 2), 1, 48, 0.1, x), "block_size in"),
        (triton_quant, "_quant_prepass", lambda: triton_quant.quantize_triton(x, x, x, perm, 16, "fp8"),
         r"block_size in \(32, 64, 128\)"),
        (triton_quant, "_quant_prepass", lambda: triton_quant.quantize_triton(
            x[..., :48], x[..., :48], x[..., :48], perm, 32, "int8"), r"head_dim in \(64, 128\)"),
        (triton_csr, "_mask_to_csr", lambda: triton_csr.mask_to_csr_triton(
            torch.ones(1, triton_csr.MAX_COLUMNS + 1, dtype=torch.bool), 4), "columns"),
        (triton_mlp, "_predicated_linear", lambda: triton_mlp.predicated_mlp(
            x[0, 0], torch.zeros(96, dtype=torch.bool), x[0, 0, :32], x[0, 0, :32], x[0, 0, :48, :32],
            torch.empty_like(x[0, 0])), "w_down"),
    ]
    for module, kernel, call, match in cases:
        with monkeypatch.context() as patch:
            _refused_before_launch(patch, module, kernel, call, match)


def test_the_pooling_kernel_tiles_every_layout_block_size():
    """Defect F11: the GPU's configs read 32 or 64 rows per load past a block of 48 slots; now a config's rows
    divide the block size, and the kernel's result (the interpreter's on the CPU) equals the PyTorch twin at 48."""
    triton = pytest.importorskip("triton")
    from sparsevid.kernels.triton_pool import _prune, pool_blocks_triton, tiles
    from sparsevid.kernels.pooling import pool_blocks_reference

    gpu_configs = [triton.Config({"ROWS": r}, num_warps=w) for r, w in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8))]
    for block_size in (16, 32, 48, 64, 80, 96, 112, 128, 144, 256):
        kept = _prune(gpu_configs, {"BLOCK_SIZE": block_size})
        assert kept and all(block_size % c.kwargs["ROWS"] == 0 for c in kept) and tiles(block_size)
    layout = sv.VideoLayout(2, 4, 8, tile=(4, 8), block_size=48)
    x = torch.randn(1, 2, layout.num_tokens, 64, dtype=torch.float16, device=DEVICE)
    tables = layout.on(DEVICE)
    torch.testing.assert_close(pool_blocks_triton(x, tables.perm, tables.block_tokens, 48),
                               pool_blocks_reference(x, layout))
