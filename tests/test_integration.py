"""Regression tests of the integration defects: attention backends, positional calls, text-token cost,
training after inference, apply-time validation, stale handles, plan indexing and the smaller gaps."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import sparsevid as sv  # noqa: E402
from tiny_models import tiny_wan, wan_inputs  # noqa: E402
from tiny_video_models import MODELS  # noqa: E402

TILING = dict(tile=(2, 4), block_size=16)


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------ attention backends
@pytest.fixture
def restore_active_backend():
    """diffusers' set_attention_backend also sets the process-wide active backend: put it back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.parametrize("order", ["backend first", "apply first"])
def test_sparse_layers_run_under_another_attention_backend(order, restore_active_backend):
    """Defect 1: set_attention_backend('flex') made sparsevid a silent no-op."""
    model, inputs = tiny_wan(), wan_inputs()
    native = run(model, inputs)
    if order == "backend first":
        model.set_attention_backend("flex")
    handle = sv.apply(model, method="draft", density=0.2, dense_layers=0, **TILING)
    if order == "apply first":
        model.set_attention_backend("flex")
    sparse = run(model, inputs)
    assert handle.stats()["sparse_calls"] == 2 and not torch.allclose(sparse, native, atol=1e-3)
    handle.remove()
    torch.testing.assert_close(run(model, inputs), native, rtol=1e-4, atol=1e-4)  # flex itself, dense again


def test_dense_layers_keep_the_users_backend_and_the_context_manager_works(monkeypatch):
    from diffusers.models import attention_dispatch as ad

    calls = []
    native_flash = ad._AttentionBackendRegistry._backends[ad.AttentionBackendName.FLASH]

    def fake_flash(query, key, value, **kwargs):  # stands in for flash-attn (not installable on a CPU)
        calls.append(query.shape)
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value))).transpose(1, 2)

    monkeypatch.setitem(ad._AttentionBackendRegistry._backends, ad.AttentionBackendName.FLASH, fake_flash)
    monkeypatch.setattr(ad, "_check_attention_backend_requirements", lambda backend: None)
    model, inputs = tiny_wan(num_layers=3), wan_inputs()
    handle = sv.apply(model, method="draft", density=0.2, dense_layers=1, **TILING)
    with ad.attention_backend("flash"):
        run(model, inputs)
    stats = handle.stats()
    # layer 0 is dense: it ran on the user's flash; layers 1-2 ran sparse; cross-attention stayed flash
    assert stats["sparse_calls"] == 2 and stats["dense_calls"] == 1
    assert len(calls) == 1 + 3  # one dense self-attention + three cross-attentions
    handle.remove()
    assert ad._AttentionBackendRegistry._backends[ad.AttentionBackendName.FLASH] is fake_flash  # wrappers gone
    assert native_flash is not fake_flash


def test_diffusers_dispatch_registry_is_what_sparsevid_expects():
    """Fails loudly when diffusers changes how dispatch_attention_fn finds backends (sparsevid wraps them)."""
    import inspect

    from diffusers.models import attention_dispatch as ad

    assert isinstance(ad._AttentionBackendRegistry._backends, dict) and ad._AttentionBackendRegistry._backends
    source = inspect.getsource(ad.dispatch_attention_fn)
    assert "_AttentionBackendRegistry._backends.get(" in source and "get_active_backend()" in source
    assert "return backend_fn(**kwargs)" in source


def test_a_layer_that_never_calls_attention_is_an_error():
    model, inputs = tiny_wan(), wan_inputs()
    handle = sv.apply(model, method="draft", density=0.2, dense_layers=0, **TILING)
    model.blocks[0].attn1.processor = lambda attn, hidden_states, *args, **kwargs: hidden_states  # attention bypassed
    with pytest.raises(RuntimeError, match="made no attention call"):
        run(model, inputs)
    handle.remove()


# ------------------------------------------------------------------------------ positional calls
def test_positional_calls_read_the_timestep():
    """Defect 2: args[2] (encoder_hidden_states) was read as the timestep."""
    model, inputs = tiny_wan(), wan_inputs()
    handle = sv.apply(model, method="draft", density=0.2, dense_layers=0, dense_steps=1, **TILING)
    args = (inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        model(*args, return_dict=False)  # step 0: dense
        assert handle.stats()["sparse_calls"] == 0
        model(args[0], torch.full((2,), 400), args[2], return_dict=False)  # step 1: sparse
    assert handle.stats()["sparse_calls"] == 2
    handle.remove()


# ------------------------------------------------------------------------------ text tokens cost their rows
def test_one_text_token_does_not_make_the_reference_dense(monkeypatch):
    """Defect 3: a text row kept every block, and every chunk gathered keys up to the longest row."""
    from sparsevid.kernels import reference

    widths = []
    real_attend = reference._attend

    def spy(q, k, v, slots, counts, keys, unit, scale, **options):
        return real_attend(q, k, v, slots, counts, lambda b, w: widths.append(w * len(b)) or keys(b, w), unit, scale,
                           **options)

    monkeypatch.setattr(reference, "_attend", spy)
    for text in (0, 1):
        layout = sv.VideoLayout(4, 8, 16, text_tokens=text, tile=(4, 4), block_size=16)
        q, k, v = torch.randn(3, 1, 2, layout.num_tokens, 16).unbind(0)
        plan = sv.plan(q, k, layout, method="draft", density=0.1, budget="row")
        widths.clear()
        out = sv.sparse_attention(q, k, v, plan)
        oracle = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.to_mask())
        torch.testing.assert_close(out, oracle, rtol=1e-5, atol=1e-5)
        gathered = sum(widths)
        if text == 0:
            no_text = gathered
    assert gathered < 2 * no_text  # was NB x NB blocks gathered with one text token


def test_token_plan_width_is_bounded_by_video_rows():
    layout = sv.VideoLayout(2, 8, 16, text_tokens=5, tile=(4, 4), block_size=16)
    q, k, v = torch.randn(3, 1, 2, layout.num_tokens, 16).unbind(0)
    plan = sv.plan(q, k, layout, method="finegrained", density=0.1)
    assert plan.max_tokens < layout.num_tokens // 2  # was L: the text rows' width
    assert bool((plan.kv_num_tokens[..., layout.is_text_block] == layout.num_tokens).all())
    oracle = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.to_mask())
    torch.testing.assert_close(sv.sparse_attention(q, k, v, plan), oracle, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ training after inference
@pytest.mark.parametrize("method", ["draft", "xattn", "window"])
def test_training_after_inference(method):
    """Defect 4: tables cached under inference_mode broke a later forward with grad."""
    layout = sv.VideoLayout(2, 8, 8, text_tokens=3, tile=(4, 4), block_size=16)
    q, k, v = torch.randn(3, 1, 2, layout.num_tokens, 16).unbind(0)
    with torch.inference_mode():
        sv.sparse_attention(q, k, v, sv.plan(q, k, layout, method=method, density=0.3))
    fresh = sv.VideoLayout(2, 8, 8, text_tokens=3, tile=(4, 4), block_size=16)  # lru caches hit too
    for lay in (layout, fresh):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = sv.sparse_attention(qg, kg, vg, sv.plan(qg, kg, lay, method=method, density=0.3))
        out.square().sum().backward()
        assert qg.grad is not None and torch.isfinite(vg.grad).all()


def test_pipeline_inference_then_training_forward():
    model, inputs = tiny_wan(), wan_inputs()
    handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, **TILING)
    with torch.inference_mode():
        model(**inputs)
    out = model(**inputs)[0]  # the reference backend trains: grads flow through the sparse layers
    out.mean().backward()
    assert model.blocks[0].attn1.to_q.weight.grad is not None
    handle.remove()


# ------------------------------------------------------------------------------ apply validates everything
BAD_APPLY = [
    (dict(density=0), ValueError, "density"),
    (dict(density=1.5), ValueError, "density"),
    (dict(density=float("nan")), ValueError, "density"),
    (dict(density=0.1, mass=0.5), ValueError, "density or mass"),
    (dict(backend="bogus"), ValueError, "backend"),
    (dict(budgt="row"), TypeError, "budgt"),
    (dict(budget="everything"), ValueError, "budget"),
    (dict(block_size=24), ValueError, "block_size"),
    (dict(tile=(2.5, 4)), TypeError, "tile"),
    (dict(dense_steps=1.5), ValueError, "dense_steps"),
    (dict(dense_layers=-1), ValueError, "dense_layers"),
    (dict(replan_every=0), ValueError, "replan_every"),
    (dict(method="nope"), ValueError, "method"),
    (dict(method="random", mass=0.5), ValueError, "mass"),
    (dict(method=None, density=0.1), ValueError, "method=None"),
]


@pytest.mark.parametrize("kwargs,exc,fragment", BAD_APPLY, ids=[str(c[0]) for c in BAD_APPLY])
def test_apply_rejects_bad_settings_before_hooking(kwargs, exc, fragment):
    """Defect 5: these failed only at the first sparse forward."""
    model = tiny_wan()
    with pytest.raises(exc, match=fragment):
        sv.apply(model, **kwargs)
    assert not getattr(model, "_diffusers_hook", None) or not model._diffusers_hook.hooks  # nothing hooked


# ------------------------------------------------------------------------------ stale handles
def test_a_stale_handle_does_not_remove_newer_hooks():
    """Defect 6."""
    model, inputs = tiny_wan(), wan_inputs()
    h1 = sv.apply(model, method="draft", density=0.2, dense_layers=0, **TILING)
    sv.remove(model)
    h2 = sv.apply(model, method="draft", density=0.2, dense_layers=0, **TILING)
    h1.remove()
    run(model, inputs)
    assert h2.stats()["sparse_calls"] == 2  # h2's hooks still there
    h2.remove()
    assert not model._diffusers_hook.hooks


# ------------------------------------------------------------------------------ plan indexing
def test_integer_indexing_of_plans():
    """Defect 7: plan[-1] and out-of-range indices returned empty plans with density NaN."""
    layout = sv.VideoLayout(2, 8, 8, tile=(4, 4), block_size=16)
    q = torch.randn(3, 2, layout.num_tokens, 16)
    plan = sv.plan(q, q, layout, method="draft", density=0.3)
    last = plan[-1]
    assert last.shape == (1, 2) and torch.equal(last.to_dense()[0], plan.to_dense()[2])
    assert not math.isnan(plan[-1, -2].density)
    for bad in (5, -4, (0, 2)):
        with pytest.raises(IndexError):
            plan[bad]


# ------------------------------------------------------------------------------ smaller gaps
LAYOUT = sv.VideoLayout(2, 4, 8, tile=(4, 4), block_size=16)
Q = torch.randn(1, 2, LAYOUT.num_tokens, 16)

SMALL_GAPS = [
    ("block_size=0", lambda: sv.plan(Q, Q, LAYOUT, method="draft", block_size=0), ValueError, "block_size"),
    ("tile float", lambda: sv.VideoLayout(2, 4, 8, tile=(2.5, 4)), TypeError, "tile"),
    ("radius bool", lambda: sv.plan(Q, Q, LAYOUT, method="window", radius=(True, 1, 1)), ValueError, "radius"),
    ("zero batch", lambda: sv.plan(Q[:0], Q[:0], LAYOUT), ValueError, "batch"),
    ("zero heads", lambda: sv.plan(Q[:, :0], Q[:, :0], LAYOUT), ValueError, "heads"),
    ("zero head dim", lambda: sv.plan(Q[..., :0], Q[..., :0], LAYOUT), ValueError, "head_dim"),
    ("attention zero batch", lambda: sv.sparse_attention(Q[:0], Q[:0], Q[:0], sv.plan(Q, Q, LAYOUT, method="dense")),
     ValueError, "batch"),
    ("from_block_mask tuple", lambda: sv.BlockPlan.from_block_mask((2, 4, 8), torch.ones(1, 1, 4, 4, dtype=torch.bool)),
     TypeError, "layout"),
]


@pytest.mark.parametrize("call,exc,fragment", [c[1:] for c in SMALL_GAPS], ids=[c[0] for c in SMALL_GAPS])
def test_smaller_gaps_raise_named_errors(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


def test_numpy_scale_is_accepted():
    plan = sv.plan(Q, Q, LAYOUT, method="draft", density=0.5)
    a = sv.sparse_attention(Q, Q, Q, plan, scale=np.float32(0.1))
    b = sv.sparse_attention(Q, Q, Q, plan, scale=0.1)
    torch.testing.assert_close(a, b)


def test_nan_in_v_reaches_only_rows_whose_plan_computes_that_key():
    """Documented (sparse_attention's docstring): a NaN value row spreads exactly along the plan."""
    q, k, v = torch.randn(3, 1, 1, LAYOUT.num_tokens, 16).unbind(0)
    v[0, 0, 5] = float("nan")
    plan = sv.plan(q, k, LAYOUT, method="window", radius=(0, 0, 0))
    out = sv.sparse_attention(q, k, v, plan)
    reaches = plan.to_mask()[0, 0, :, 5]
    assert torch.equal(out[0, 0].isnan().any(-1), reaches) and not bool(reaches.all())


def test_testbed_seed_is_checked():
    from sparsevid import testbed

    tb = testbed.load_pipeline()
    for seed in (1.5, 2**70, -1, True):
        with pytest.raises(ValueError, match="seed"):
            tb(label=tb.labels[0], seed=seed, steps=1, frames=2, height=16, width=16, progress=False)


def test_cli_errors_are_one_line_and_options_take_bare_words(capsys):
    from sparsevid.lab.bench.common import option_pair
    from sparsevid.lab.cli import main

    assert option_pair("budget=layer") == ("budget", "layer")  # what a shell leaves of budget='layer'
    assert option_pair("budget='layer'") == ("budget", "layer") and option_pair("tile=(8, 16)") == ("tile", (8, 16))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--densities", "2", "--out", "/tmp/sparsevid-test-eval"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--densities" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ backward
def test_forward_only_backends_refuse_requires_grad_up_front():
    """Defect 9: the Triton backend failed with PyTorch's generic 'no autograd formula'."""
    layout = sv.VideoLayout(2, 4, 8, tile=(4, 4), block_size=16)
    q = torch.randn(1, 2, layout.num_tokens, 64, dtype=torch.float16, requires_grad=True)
    plan = sv.plan(q.detach(), q.detach(), layout, method="draft", density=0.5)
    for backend in ("triton", "fa4"):
        with pytest.raises(ValueError, match="requires_grad|usable|cuda"):
            sv.sparse_attention(q, q, q, plan, backend=backend)
    assert sv.sparse_attention(q.float(), q.float(), q.float(), plan).requires_grad  # auto: the reference trains
    rows = {d["name"]: d["backward"] for d in sv.describe_backends()}
    assert rows == {"reference": ["cpu", "cuda", "mps", "xpu"], "flex": ["cuda"], "triton": [], "fa4": [],
                    "reference-int8": [], "reference-fp8": [], "triton-int8": [], "triton-fp8": []}  # 8-bit: forward only


def test_every_supported_model_module_list_matches_its_tiny_forward():
    """The registry's modules are exactly those whose attention sees the video grid (spot check)."""
    build, make_inputs = MODELS["MotifVideoTransformer3DModel"]
    model = build()
    from sparsevid.integrations.models import model_spec

    spec = model_spec(model)
    assert len(spec.self_attention(model)) == 1 + 1  # dual block + one encoder single block (decoder left dense)


# ------------------------------------------------------------------------------ tile order through the model
def test_tile_order_through_the_model_equals_gathering_per_call():
    model, inputs = tiny_wan(), wan_inputs()
    native = run(model, inputs)
    outs = {}
    for tile_order in (False, True):
        handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, tile_order=tile_order, **TILING)
        outs[tile_order] = run(model, inputs)
        assert handle.sessions[0].tiled is tile_order
        handle.remove()
        handle = sv.apply(model, method="dense", dense_layers=0, tile_order=tile_order, **TILING)
        torch.testing.assert_close(run(model, inputs), native, rtol=1e-5, atol=1e-5)
        handle.remove()
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[True], native, atol=1e-3)
    assert torch.equal(run(model, inputs), native)  # hooks on rope / patch embedding / proj_out removed


def test_tile_order_is_refused_where_it_cannot_hold():
    build, _ = MODELS["CogVideoXTransformer3DModel"]
    with pytest.raises(ValueError, match="tile_order"):
        sv.apply(build(), tile_order=True)
    with pytest.raises(ValueError, match="token replay"):
        sv.apply(tiny_wan(), tile_order=True, reuse=sv.reuse.TokenReplay(rate=0.1))
    model, inputs = tiny_wan(), wan_inputs()
    handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, **TILING)
    run(model, {**inputs, "timestep": torch.full((2, 105), 500)})  # per-token timesteps (Wan 2.2 TI2V)
    assert handle.sessions[0].tiled is False and handle.stats()["sparse_calls"] == 2
    handle.remove()


def test_step_caches_keep_one_token_order():
    """Tile order only for forwards with sparse layers would mix orders in a cache across steps."""
    from diffusers.hooks import FirstBlockCacheConfig

    model, inputs = tiny_wan(), wan_inputs()
    outs = {}
    for tile_order in (None, False):
        handle = sv.apply(model, method="dense", dense_layers=0, dense_steps=1, tile_order=tile_order,
                          reuse=FirstBlockCacheConfig(threshold=10.0), **TILING)
        with model.cache_context("cond"):
            outs[tile_order] = [run(model, {**inputs, "timestep": torch.full((2,), t)}) for t in (900, 800)]
        assert handle.sessions[0].tiled is False
        handle.remove()
    for a, b in zip(*outs.values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="tile_order"):
        sv.apply(model, tile_order=True, reuse=FirstBlockCacheConfig(threshold=0.1))


def test_a_named_backend_is_checked_against_the_method_and_the_device():
    model = tiny_wan()
    with pytest.raises(TypeError, match="TokenPlan"):
        sv.apply(model, method="finegrained", backend="fa4")
    with pytest.raises(ValueError, match="backend 'fa4'"):
        sv.apply(model, method="draft", backend="fa4")  # a CPU model
    assert not model._diffusers_hook.hooks if getattr(model, "_diffusers_hook", None) else True


def test_grad_on_k_or_v_alone_goes_to_a_backend_that_trains():
    layout = sv.VideoLayout(2, 4, 8, tile=(4, 4), block_size=16)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # triton runs on the CPU only interpreted
    q, k, v = torch.randn(3, 1, 2, layout.num_tokens, 64, dtype=torch.float16, device=device).unbind(0)
    plan = sv.plan(q, k, layout, method="draft", density=0.5)
    k.requires_grad_()
    with pytest.raises(ValueError, match="requires_grad"):
        sv.sparse_attention(q, k, v, plan, backend="triton")
    out = sv.sparse_attention(q.float(), k.float(), v.float(), plan)  # auto: the reference
    out.sum().backward()
    assert k.grad is not None
