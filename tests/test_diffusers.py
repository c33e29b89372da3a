"""sparsevid.apply on diffusers video transformers (tiny random-weight configs, CPU)."""

import pytest
import torch

pytest.importorskip("diffusers")

import sparsevid as sv  # noqa: E402
from tiny_models import tiny_wan, tiny_wan_pipeline, wan_inputs  # noqa: E402

TILING = dict(tile=(2, 4), block_size=16)  # small blocks so tiny grids have several of them
# density 1 = native, sparse differs, remove() restores: for every supported class in test_models.py


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_dense_layers_and_steps_run_native():
    model, inputs = tiny_wan(num_layers=2), wan_inputs()
    native = run(model, inputs)
    handle = sv.apply(model, method="draft", density=0.2, dense_layers=1, **TILING)
    run(model, inputs)
    assert handle.stats()["dense_calls"] == 1 and handle.stats()["sparse_calls"] == 1
    handle.remove()
    with pytest.raises(ValueError, match="dense_layers < 2"):  # every layer dense: nothing would run sparse
        sv.apply(model, method="draft", density=0.2, dense_layers=2, **TILING)
    assert not model._diffusers_hook.hooks
    handle = sv.apply(model, method="draft", density=0.2, dense_steps=1, dense_layers=0, **TILING)
    assert torch.equal(run(model, inputs), native)  # step 0 is dense
    sparse = run(model, {**inputs, "timestep": torch.full((2,), 400)})  # step 1
    assert handle.stats()["plans"] == 2 and not torch.equal(sparse, native)
    handle.remove()


def test_preset_sets_the_session_config_and_is_checked_before_any_hook():
    from dataclasses import replace

    from sparsevid.integrations.core import budget

    model, inputs = tiny_wan(num_layers=2), wan_inputs()
    handle = sv.apply(model, preset="balanced", dense_layers=0, **TILING)
    assert handle.config.density == 0.25 and handle.sessions[0].config.density == 0.25
    run(model, inputs)
    assert handle.stats()["budget"] == "density=0.25"
    handle.remove()
    default = sv.apply(model, **TILING).config
    sv.remove(model)
    fast = sv.apply(model, preset="fast", **TILING).config
    sv.remove(model)
    assert budget(default)[:2] == budget(fast)[:2] == ("density", 0.1)  # no options = "fast" (draft's default)
    assert replace(default, density=0.1) == fast
    for kwargs, match in ((dict(preset="balanced", density=0.3), "preset='balanced' or density=0.3"),
                          (dict(preset="bogus"), r"Expect preset in \['balanced', 'fast'\]")):
        with pytest.raises(ValueError, match=match):
            sv.apply(model, **kwargs, **TILING)
        assert not model._diffusers_hook.hooks


def test_replan_every_reuses_plans():
    model, inputs = tiny_wan(num_layers=2), wan_inputs()
    handle = sv.apply(model, method="draft", density=0.2, dense_layers=0, replan_every=2, **TILING)
    for t in (900, 800, 700, 600):
        run(model, {**inputs, "timestep": torch.full((2,), t)})
    assert handle.stats()["plans"] == 2 * 2  # planned at steps 0 and 2, reused at 1 and 3
    handle.remove()
    handle = sv.apply(model, method="clustered", density=0.2, dense_layers=0, q_clusters=4, k_clusters=4, **TILING)
    for t in (900, 800, 700, 600, 500):
        run(model, {**inputs, "timestep": torch.full((2,), t)})
    assert handle.stats()["plans"] == 2 * 2  # the planner's default: planned at steps 0 and 4
    assert handle.stats()["replan_every"] == 4
    handle.remove()


def test_pipeline_end_to_end_with_default_warmup():
    pipe = tiny_wan_pipeline()
    kwargs = dict(
        prompt="a bunny runs in the grass", negative_prompt="blue sky", height=48, width=80, num_frames=9,
        num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16, output_type="pt",
    )
    native = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    handle = sv.apply(pipe, method="draft", density=0.2, dense_layers=0, **TILING)
    sparse = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    # default warm-up: ceil(20% of 3) = 1 dense step; 2 sparse steps x (cond, uncond) x 2 layers
    assert handle.stats()["plans"] == 2 * 2 * 2
    sv.remove(pipe)
    assert torch.isfinite(sparse).all() and sparse.shape == native.shape
    assert not torch.equal(sparse, native)
    assert torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames, native)


def test_torch_compile_and_cache_hooks_compose():
    from diffusers.hooks import FirstBlockCacheConfig

    model, inputs = tiny_wan(num_layers=2), wan_inputs()
    handle = sv.apply(model, method="draft", density=0.2, dense_layers=0, **TILING)
    eager = run(model, inputs)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(run(compiled, inputs), eager)
    handle.remove()

    model.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    handle = sv.apply(model, method="draft", density=0.2, dense_layers=0, **TILING)
    with model.cache_context("cond"):
        out = run(model, inputs)
    assert torch.isfinite(out).all() and handle.stats()["plans"] > 0
    handle.remove()
    model.disable_cache()


def test_errors():
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        sv.apply(torch.nn.Linear(2, 2))  # lists the supported models
    with pytest.raises(TypeError, match="pipeline"):
        sv.apply(object())
    model = tiny_wan()
    with pytest.raises(ValueError, match="method"):
        sv.apply(model, method="nope")
    with pytest.raises(ValueError, match="dense_steps"):
        sv.apply(model, dense_steps=1.5)
    with pytest.raises(ValueError, match="replan_every"):
        sv.apply(model, replan_every=0)
    handle = sv.apply(model)
    with pytest.raises(ValueError, match="already|remove"):
        sv.apply(model)
    handle.remove()
    with pytest.raises(ValueError, match="dense_steps as an int"):
        sv.apply(model, dense_steps=0.2, dense_layers=0)
        run(model, wan_inputs())
    sv.remove(model)


def test_bench_e2e_smoke_on_cpu(tmp_path):
    from sparsevid.lab.cli import main

    args = ["bench", "e2e", "--model", "tiny-wan", "--steps", "2", "--reps", "1", "--densities", "0.2",
            "--dense-layers", "0", "--out", str(tmp_path), "--record", "--benchmarks-md", str(tmp_path / "B.md")]
    assert main(args) == 0
    text = (tmp_path / "B.md").read_text()
    assert "bench e2e — tiny-wan" in text and "| draft | 0.2 |" in text


def test_bench_e2e_replan_every_times_the_planning_and_the_reusing_forward(tmp_path, monkeypatch):
    """`--replan-every 3`: each timed forward stands a step after the last, so the cached plans are reused (a forward
    repeated at one step was another call of that step and planned afresh); the row holds the planning and the
    reusing forwards' times and their mean over 3 steps, and the reusing forwards made no plan (checked in the run)."""
    import json

    from sparsevid.lab.bench import e2e
    from sparsevid.lab.cli import main

    times = iter(float(t) for t in range(100, 200))
    monkeypatch.setattr(e2e, "time_ms", lambda fn, **kwargs: (fn(), next(times))[1])
    assert main(["bench", "e2e", "--model", "tiny-wan", "--reps", "1", "--densities", "0.2", "--dense-layers", "0",
                 "--replan-every", "3", "--out", str(tmp_path)]) == 0
    row = next(r for r in json.loads(next(tmp_path.glob("e2e_*.json")).read_text())["rows"] if r["density"] == 0.2)
    assert row["replan_every"] == 3
    assert row["forward_ms"] == pytest.approx((row["plan_forward_ms"] + 2 * row["reuse_forward_ms"]) / 3)
