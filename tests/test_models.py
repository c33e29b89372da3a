"""sparsevid.apply on every diffusers video transformer the model registry supports (tiny configs, CPU),
and a clear refusal for every other 3D transformer class of diffusers."""

import pytest
import torch

pytest.importorskip("diffusers")

import sparsevid as sv  # noqa: E402
from sparsevid.integrations.models import REFUSED, supported_models  # noqa: E402
from tiny_video_models import MODELS  # noqa: E402

TILING = dict(tile=(2, 4), block_size=16)  # small blocks so tiny grids have several of them
# Helios' self-attention starts with a dense run of history-frame tokens, so its plans are denser


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def test_every_supported_class_has_a_tiny_config():
    assert sorted(MODELS) == supported_models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_plan_equals_native_sparse_differs_remove_restores(name):
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs()  # odd grid: 3 frames x 5 x 7 tokens
    native = run(model, inputs)

    handle = sv.apply(model, method="dense", dense_layers=0, **TILING)
    dense = run(model, inputs)
    stats = handle.stats()
    handle.remove()
    assert stats["sparse_calls"] > 0 and stats["dense_calls"] == 0  # every layer went through sparsevid
    tol = 1e-3 if name == "SanaWMTransformer3DModel" else 1e-5  # Sana-WM casts q, k, v to bf16 for attention
    torch.testing.assert_close(dense, native, rtol=tol, atol=tol)

    handle = sv.apply(model, method="draft", density=0.2, dense_layers=0, **TILING)
    sparse = run(model, inputs)
    stats = handle.stats()
    handle.remove()
    assert torch.isfinite(sparse).all()
    assert (sparse - native).abs().max() > 1e-4, "sparse attention changed nothing"
    assert stats["sparse_calls"] > 0 and stats["mean_density"] < 0.9

    assert torch.equal(run(model, inputs), native)  # bit-identical after removal
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in model.modules())


def test_other_grid_sizes_work():
    build, make_inputs = MODELS["WanTransformer3DModel"]
    model = build()
    handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, **TILING)
    for grid in ((1, 1, 1), (2, 3, 9), (4, 4, 4)):
        out = run(model, make_inputs(*grid))
        assert torch.isfinite(out).all()
    assert handle.stats()["sparse_calls"] == 3 * 2
    handle.remove()


def _fake(name):
    return type(name, (torch.nn.Module,), {})()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_classes_say_why(name):
    with pytest.raises(ValueError, match=name) as error:
        sv.apply(_fake(name))
    assert REFUSED[name][:30] in str(error.value)


def test_every_diffusers_3d_transformer_is_supported_or_refused():
    import inspect

    import diffusers.models.transformers as transformers

    classes = {n for n, c in inspect.getmembers(transformers, inspect.isclass)
               if n.endswith("Transformer3DModel") or n == "TransformerTemporalModel"}
    assert len(classes) >= 25
    unknown = classes - set(supported_models()) - set(REFUSED)
    assert not unknown, f"neither supported nor refused: {sorted(unknown)}"


def test_refused_configurations_and_calls():
    build, make_inputs = MODELS["SkyReelsV2Transformer3DModel"]
    model = build()
    model.register_to_config(num_frame_per_block=3)  # diffusion forcing: a block-causal mask
    with pytest.raises(ValueError, match="num_frame_per_block"):
        sv.apply(model)
    build, make_inputs = MODELS["Kandinsky5Transformer3DModel"]
    model = build()
    handle = sv.apply(model, dense_layers=0, **TILING)
    with pytest.raises(NotImplementedError, match="NABLA"):
        run(model, {**make_inputs(), "sparse_params": {"sta_mask": None}})
    handle.remove()


def test_unknown_class_lists_supported():
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        sv.apply(torch.nn.Linear(2, 2))


def test_readme_lists_the_registry():
    from pathlib import Path

    from sparsevid.integrations.models import markdown_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- models:start -->\n")[1].split("\n<!-- models:end -->")[0]
    assert block == markdown_table(), "README is stale: paste `python -m sparsevid models` between the markers"
