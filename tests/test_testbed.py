"""The testbed model: committed weights load, sampling is seeded and well-formed, sv.apply accepts it.

CPU and small: 4 frames of 32x32 px (4x8x8 tokens) and 2-3 sampler steps per video.
"""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

import sparsevid as sv  # noqa: E402
from sparsevid import data, testbed  # noqa: E402
from sparsevid.testbed import model as tb_model  # noqa: E402

SMALL = dict(steps=2, frames=4, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def tb():
    return testbed.load_pipeline(device="cpu")


def test_weights_committed_small_and_documented():
    assert testbed.WEIGHTS.is_file()
    assert testbed.WEIGHTS.stat().st_size <= 15 * 2**20
    info = json.loads((testbed.WEIGHTS.parent / "testbed.json").read_text())
    for key in ("command", "date", "device", "final_loss", "steps"):
        assert key in info, key
    assert info["final_loss"] < info["first_loss"]  # it learned something


def test_pipeline_shape(tb):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    assert isinstance(tb.transformer, WanTransformer3DModel)
    assert isinstance(tb.scheduler, FlowMatchEulerDiscreteScheduler)
    assert tuple(tb.labels) == tuple(data.CLIPS)
    assert tb.dtype == torch.float32 and tb.device.type == "cpu"
    # native size: >= 4,000 video tokens per sample
    cfg = tb.transformer.config
    f, h, w = (testbed.SAMPLE[k] // p for k, p in zip(("frames", "height", "width"), cfg.patch_size))
    assert f * h * w >= 4000


def test_output_range_and_determinism(tb):
    a = tb(label=tb.labels[0], seed=0, **SMALL)
    b = tb(label=tb.labels[0], seed=0, **SMALL)
    c = tb(label=tb.labels[0], seed=1, **SMALL)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_labels_condition_the_output(tb):
    a = tb(label=tb.labels[0], seed=0, **SMALL)
    b = tb(label=tb.labels[1], seed=0, **SMALL)
    assert (a - b).abs().mean() > 1e-3


def test_bad_arguments(tb):
    with pytest.raises(ValueError, match="label"):
        tb(label="nope", **SMALL)
    with pytest.raises(ValueError, match="multiple of 4"):
        tb(label=tb.labels[0], steps=1, frames=2, height=30, width=32, progress=False)
    with pytest.raises(ValueError, match="steps"):
        tb(label=tb.labels[0], steps=0, progress=False)


def test_missing_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        testbed.load_pipeline(device="cpu", weights=tmp_path / "none.safetensors")


def test_sparsevid_apply_and_remove(tb):
    # 4 frames x 64x64 px = 4x16x16 tokens = 8 blocks of 128: draft plans really choose
    kwargs = dict(label=tb.labels[1], seed=3, steps=3, frames=4, height=64, width=64, progress=False)
    dense = tb(**kwargs)
    handle = sv.apply(tb, method="draft", density=0.25)
    sparse = tb(**kwargs)
    stats = handle.stats()
    handle.remove()
    again = tb(**kwargs)
    assert stats["plans"] > 0 and stats["mean_density"] < 0.5
    assert not torch.equal(sparse, dense)
    assert torch.equal(again, dense)


def test_save_load_roundtrip(tmp_path):
    transformer, labels = tb_model.build_transformer(seed=5), tb_model.build_label_embedding(seed=5)
    path = tb_model.save_weights(tmp_path / "w.safetensors", transformer, labels, {"note": "x"})
    t2, l2, meta = tb_model.load_weights(path)
    assert meta["info"] == {"note": "x"}
    for (k, v), (k2, v2) in zip(transformer.state_dict().items(), t2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert torch.equal(labels.table.weight, l2.table.weight)


def test_training_smoke(tmp_path):
    from sparsevid.testbed import train

    code = train.main(["--steps", "2", "--batch", "1", "--frames", "4", "--size", "32", "--device", "cpu",
                       "--no-samples", "--out", str(tmp_path)])
    assert code == 0
    for name in ("testbed.safetensors", "testbed.json", "testbed_loss.json", "testbed_loss.png"):
        assert (tmp_path / name).is_file(), name
    info = json.loads((tmp_path / "testbed.json").read_text())
    assert info["steps"] == 2 and info["device"].startswith("CPU")
    testbed.load_pipeline(device="cpu", weights=tmp_path / "testbed.safetensors")
