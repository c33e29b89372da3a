"""The ComfyUI node on ComfyUI's own Wan and HunyuanVideo models (the trimmed snapshot in
../shared/vendor/comfyui, or a ComfyUI checkout at $COMFYUI_PATH), sampled with ComfyUI's sampler.

Skipped when ComfyUI is not importable; `make test` runs this file in a second environment with the
packages ComfyUI needs (see the Makefile).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

_SNAPSHOT = Path(__file__).resolve().parents[2] / "shared" / "vendor" / "comfyui"
for _path in (os.environ.get("COMFYUI_PATH"), _SNAPSHOT):
    if _path and Path(_path, "comfy").is_dir():
        sys.path.insert(0, str(_path))
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the node folder's parent
        break

try:  # ComfyUI reads its command line at import: run it on the CPU
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_patcher  # noqa: F401
    import comfy.sample  # noqa: F401
except Exception as error:  # noqa: BLE001 - a missing ComfyUI or one of its packages
    pytest.skip(f"ComfyUI is not importable here ({type(error).__name__}: {error})", allow_module_level=True)

import sparsevid as sv  # noqa: E402
from comfyui_sparsevid import NODE_CLASS_MAPPINGS  # noqa: E402
from sparsevid.integrations.comfyui import apply, sparse_session  # noqa: E402

TILING = dict(tile=(2, 4), block_size=16)  # small blocks so the tiny grid has several
STEPS = 5


def tiny_wan(layers=2, kind="T2V", **extra):
    import comfy.supported_models

    config = dict(image_model="wan2.1", model_type=kind.lower(), patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=64,
                  ffn_dim=128, freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=layers)
    return _patcher(getattr(comfy.supported_models, f"WAN21_{kind}")({**config, **extra}))


def tiny_vace():  # one VACE block beside the two main blocks: three video self-attention layers
    return tiny_wan(kind="Vace", vace_layers=1, vace_in_dim=96)


def tiny_i2v():  # image-to-video: the latent gains mask and image channels (no tokens)
    return tiny_wan(kind="I2V", in_dim=36)


def tiny_hunyuan():
    import comfy.supported_models

    return _patcher(comfy.supported_models.HunyuanVideo(dict(
        image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=32, hidden_size=64,
        mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256,
        patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
    )))


def _patcher(config):
    import comfy.model_patcher

    config.set_inference_dtype(torch.float32, None)
    torch.manual_seed(0)
    model = config.get_model({}, device=torch.device("cpu"))
    with torch.no_grad():  # ComfyUI's disable_weight_init leaves weights uninitialised
        for name, p in model.diffusion_model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def sample(model, frames=3, height=10, width=14, steps=STEPS):
    """ComfyUI's KSampler path: euler, CFG 4, a fixed seed; latent frames x height x width."""
    import comfy.sample

    g = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 16, frames, height, width)
    noise = torch.randn(latent.shape, generator=g)
    # Wan reads the text embedding; HunyuanVideo also a pooled vector
    positive = [[torch.randn(1, 16, 32, generator=g), {"pooled_output": torch.randn(1, 8, generator=g)}]]
    negative = [[torch.randn(1, 16, 32, generator=g), {"pooled_output": torch.randn(1, 8, generator=g)}]]
    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=0)


@pytest.mark.parametrize("build", [tiny_wan, tiny_vace, tiny_i2v, tiny_hunyuan], ids=["wan", "vace", "i2v", "hunyuan"])
def test_density_one_equals_the_unpatched_model_and_the_input_is_untouched(build):
    model = build()
    native = sample(model)
    dense = apply(model, "dense", dense_steps=0, dense_layers=0, **TILING)
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    out = sample(dense)
    stats = sparse_session(dense).stats()
    assert stats["sparse_calls"] > 0 and stats["dense_calls"] == 0  # every self-attention went through sparsevid
    torch.testing.assert_close(out, native, rtol=1e-4, atol=1e-4)
    assert torch.equal(sample(model), native)  # the input model is unchanged
    sparse = apply(model, "draft", 0.3, dense_steps=0, dense_layers=0, **TILING)
    assert not torch.allclose(sample(sparse), native, atol=1e-3)
    assert sparse_session(sparse).stats()["mean_density"] < 0.6


def test_sparse_runs_differs_and_the_warm_up_follows_the_sigmas():
    model = tiny_wan(layers=3)
    native = sample(model)
    patched = apply(model, "draft", 0.2, dense_steps=0.4, dense_layers=1, **TILING)
    out = sample(patched)
    stats = sparse_session(patched).stats()
    # 5 steps, one forward each (ComfyUI batches both guidance branches); dense_steps 0.4 of 5 -> 2 dense steps
    forwards_sparse, forwards_dense = 3, 2
    assert stats["sparse_calls"] == forwards_sparse * 2  # layers 1 and 2
    assert stats["dense_calls"] == forwards_dense * 3 + forwards_sparse * 1
    assert torch.isfinite(out).all() and not torch.allclose(out, native, atol=1e-3)


def test_odd_latent_sizes_and_the_users_own_override_stay_in_charge_of_dense_calls():
    model = tiny_wan()
    seen = []

    def users_attention(func, *args, **kwargs):  # e.g. a Sage patch another node installed
        seen.append(args[0].shape)
        return func(*args, **kwargs)

    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = users_attention
    patched = apply(model, "draft", 0.3, dense_steps=0, dense_layers=1, **TILING)
    out = sample(patched, frames=2, height=6, width=18, steps=2)  # a 2 x 3 x 9 token grid
    assert torch.isfinite(out).all() and sparse_session(patched).stats()["sparse_calls"] == 2  # 2 steps x layer 1
    assert seen  # dense layer 0 and every cross-attention went to the user's override


def test_unsupported_models_and_bad_settings_are_clear_errors():
    model = tiny_wan()
    with pytest.raises(ValueError, match="density"):
        apply(model, "draft", 1.5)
    with pytest.raises(TypeError, match="budgt"):
        apply(model, "draft", 0.1, budgt="row")
    with pytest.raises(ValueError, match="backend 'fa4'.*not cpu"):  # named, on a CPU model: refused now
        apply(model, "draft", 0.1, backend="fa4")
    with pytest.raises(ValueError, match="preset='fast' or density=0.3"):
        apply(model, "draft", 0.3, preset="fast")
    assert sparse_session(apply(model, preset="balanced", **TILING)).config.density == 0.25
    other = tiny_wan()
    other.model.diffusion_model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Linear"):
        apply(other, "draft", 0.1)


def test_the_node():
    node = NODE_CLASS_MAPPINGS["SparseVidAttention"]
    inputs = node.INPUT_TYPES()["required"]
    assert set(sv.available_planners()) == set(inputs["method"][0]) and "auto" in inputs["backend"][0]
    model = tiny_wan()
    (patched,) = node().patch(model, "draft", "density", 0.25, 0.0, 0, 1, "auto")
    assert patched is not model
    sample(patched, steps=1)
    assert sparse_session(patched).stats()["sparse_calls"] == 2  # one forward, two layers
    # left alone, the tail and the replanning interval are the method's own: clustered keeps its cluster tail
    # and replans every 4 steps
    assert node.INPUT_TYPES()["optional"]["tail"][1]["default"] == "auto" and inputs["replan_every"][1]["default"] == 0
    (patched,) = node().patch(model, "clustered", "density", 0.3, 0.0, 0, 0, "auto")
    stats = sparse_session(patched).stats()
    assert stats["replan_every"] == 4 and stats["tail"] == "auto"


def test_a_layer_that_bypasses_the_override_is_an_error():
    model = tiny_wan()
    patched = apply(model, "draft", 0.3, dense_steps=0, dense_layers=0, **TILING)

    def drop_options(args, extra):  # a block patch that loses transformer_options (and so the override)
        return extra["original_block"]({**args, "transformer_options": {}})

    patched.set_model_patch_replace(drop_options, "dit", "double_block", 1)
    with pytest.raises(RuntimeError, match="override"):
        sample(patched, steps=1)


def test_a_text_context_as_long_as_the_video_grid_is_cross_attention():
    """A 105-token text context beside a 3x5x7 grid was taken for self-attention (4 calls for 2 layers)."""
    import comfy.sample

    def run(model):
        g = torch.Generator().manual_seed(0)
        latent = torch.zeros(1, 16, 3, 10, 14)  # 3 x 5 x 7 = 105 video tokens
        noise = torch.randn(latent.shape, generator=g)
        cond = [[torch.randn(1, 105, 32, generator=g), {}]]
        return comfy.sample.sample(model, noise, 2, 4.0, "euler", "simple", cond, cond, latent, disable_pbar=True,
                                   seed=0)

    model = tiny_wan()
    dense = apply(model, "dense", dense_steps=0, dense_layers=0, **TILING)
    torch.testing.assert_close(run(dense), run(model), rtol=1e-4, atol=1e-4)
    assert sparse_session(dense).stats()["sparse_calls"] == 2 * 2  # 2 steps x 2 self-attention layers


def test_two_sparsevid_nodes_in_a_row_are_refused_clearly():
    once = apply(tiny_wan(), "dense", dense_steps=0, dense_layers=0)
    with pytest.raises(ValueError, match="two SparseVid nodes in a row"):
        apply(once, "draft", 0.3)


def test_plans_live_for_one_sampling_run():
    """replan_every=2: one-step runs kept adding cached plans (12 after 6 runs); within a run they are reused."""
    model = apply(tiny_wan(), "draft", 0.3, dense_steps=0, dense_layers=0, replan_every=2, **TILING)
    session = sparse_session(model)
    for _ in range(6):
        sample(model, steps=1)
    assert len(session._plans) == 2  # this run's plan of each layer
    made = session.stats()["plans"]
    sample(model, steps=4)
    assert session.stats()["plans"] - made == 2 * 2  # planned at steps 0 and 2, reused at 1 and 3


def test_dense_layers_must_leave_a_layer_sparse():
    with pytest.raises(ValueError, match="dense_layers < 2"):
        apply(tiny_wan(), "draft", 0.3, dense_layers=2)
