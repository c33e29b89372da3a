"""Tests for sparsevid.lab.data: bundled clips and real-data attention inputs (fast, CPU)."""

import math

import pytest
import torch

from sparsevid.lab.data import CLIPS, attention_inputs, clip_info, load_clip
from sparsevid.layout import VideoLayout

SMALL = VideoLayout(frames=4, height=8, width=12)  # L = 384


def _row_entropy(q, k):
    """Mean softmax row entropy per head as a fraction of log L: (B, h)."""
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return -(a * a.clamp_min(1e-30).log()).sum(-1).mean(-1) / math.log(q.shape[-2])


# ------------------------------------------------------------------ load_clip
@pytest.mark.parametrize("name", CLIPS)
def test_load_clip_shape_dtype_range(name):
    x = load_clip(name, frames=3, size=(24, 40))
    assert x.shape == (3, 3, 24, 40) and x.dtype == torch.float32
    assert x.is_contiguous() and torch.isfinite(x).all()
    assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.02  # a real image, not a constant


def test_load_clip_native_size():
    info = clip_info("carphone")
    x = load_clip("carphone", frames=2)
    assert x.shape == (2, 3, info["height"], info["width"]) == (2, 3, 144, 176)


def test_frames_change_over_time():
    x = load_clip("bikes", frames=8, size=(34, 80), stride=4)
    step = (x[1:] - x[:-1]).abs().mean((1, 2, 3))
    assert (step > 1e-3).all(), f"consecutive frames identical: {step}"


def test_start_and_stride_match_sequential_decode():
    # bikes has keyframes at 0, 30, 76, ...: start=40 seeks, and must still land on frame 40.
    seq = load_clip("bikes", frames=50, size=(17, 40))
    seek = load_clip("bikes", frames=4, size=(17, 40), start=40, stride=3)
    torch.testing.assert_close(seek, seq[40:50:3], rtol=0, atol=0)


def test_load_clip_errors():
    with pytest.raises(ValueError, match="bigbuckbunny"):
        load_clip("nope")
    with pytest.raises(TypeError, match="clip name"):
        load_clip(3)
    with pytest.raises(ValueError, match="frames"):
        load_clip("bigbuckbunny", frames=0)
    with pytest.raises(ValueError, match="132"):
        load_clip("bigbuckbunny", frames=100, start=40)
    with pytest.raises(ValueError, match="stride"):
        load_clip("bigbuckbunny", frames=10, stride=20)
    with pytest.raises(TypeError, match="size"):
        load_clip("bigbuckbunny", frames=1, size=32)
    with pytest.raises(TypeError, match="start"):
        load_clip("bigbuckbunny", frames=1, start=1.5)


# ------------------------------------------------------------------ attention_inputs
def test_shapes_dtype_device():
    q, k, v = attention_inputs("carphone", SMALL, heads=3, head_dim=32, batch=2, patch=4, dtype=torch.bfloat16)
    for t in (q, k, v):
        assert t.shape == (2, 3, SMALL.num_tokens, 32) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
        assert torch.isfinite(t.float()).all()


def test_deterministic_per_seed_and_seeds_differ():
    a = attention_inputs("bigbuckbunny", SMALL, seed=1)
    b = attention_inputs("bigbuckbunny", SMALL, seed=1)
    c = attention_inputs("bigbuckbunny", SMALL, seed=2)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert (x - z).abs().mean() > 0.1


def test_attention_far_from_uniform_and_one_hot():
    layout = VideoLayout(frames=4, height=12, width=16)  # L = 768
    for clip in ("bigbuckbunny", "bikes"):
        q, k, _ = attention_inputs(clip, layout, heads=2)
        ent = _row_entropy(q, k)
        assert ((0.1 < ent) & (ent < 0.9)).all(), f"{clip}: entropy / log L = {ent.tolist()}"
    # The structure comes from the inputs: Gaussian noise at the same scale is nearly uniform.
    noise = torch.randn(2, 1, layout.num_tokens, 64, generator=torch.Generator().manual_seed(0))
    assert _row_entropy(noise[0], noise[1]).item() > 0.9


def test_attention_is_spatially_local():
    # Real video + aligned q/k maps: a token's nearby tokens (any frame) get far more than their share.
    layout = SMALL
    q, k, _ = attention_inputs("bigbuckbunny", layout, heads=2)
    a = torch.softmax(q @ k.transpose(-1, -2) / 8, -1)[0]
    i = torch.arange(layout.num_tokens)
    y, x = (i // layout.width) % layout.height, i % layout.width
    near = ((y[:, None] - y[None]).abs() <= 1) & ((x[:, None] - x[None]).abs() <= 1)
    share = near.float().mean()
    assert ((a * near).sum(-1).mean(-1) > 2 * share).all()


@pytest.mark.parametrize("text_first", [True, False])
def test_text_tokens_placed_by_layout(text_first):
    T = 20
    layout = SMALL.replace(text_tokens=T, text_first=text_first)
    video = slice(T, None) if text_first else slice(0, SMALL.num_tokens)
    text = slice(0, T) if text_first else slice(SMALL.num_tokens, None)
    q1, k1, v1 = attention_inputs("bigbuckbunny", layout, seed=3)
    q2, _, _ = attention_inputs("bikes", layout, seed=3)
    q0, k0, _ = attention_inputs("bigbuckbunny", SMALL, seed=3)
    assert q1.shape[2] == layout.num_tokens
    assert torch.equal(q1[:, :, text], q2[:, :, text])  # text rows do not depend on the clip
    assert (q1[:, :, video] - q2[:, :, video]).abs().mean() > 0.1  # video rows do
    torch.testing.assert_close(q1[:, :, video], q0)  # and equal the text-free layout's
    torch.testing.assert_close(k1[:, :, video], k0)


def test_batch_elements_are_different_time_windows():
    q, _, _ = attention_inputs("bikes", SMALL, batch=3)
    q1, _, _ = attention_inputs("bikes", SMALL, batch=1)
    torch.testing.assert_close(q[:1], q1)
    assert (q[0] - q[1]).abs().mean() > 0.1 and (q[1] - q[2]).abs().mean() > 0.1


def test_tensor_clip():
    frames = load_clip("carphone", frames=6, size=(32, 48))
    q, k, v = attention_inputs(frames, SMALL, patch=4)
    assert q.shape == (1, 2, SMALL.num_tokens, 64) and torch.isfinite(q).all()
    with pytest.raises(ValueError, match="clip tensor"):
        attention_inputs(frames[:2], SMALL)


def test_attention_inputs_errors():
    with pytest.raises(TypeError, match="layout"):
        attention_inputs("bikes", None)
    with pytest.raises(ValueError, match="bigbuckbunny"):
        attention_inputs("nope", SMALL)
    with pytest.raises(ValueError, match="head_dim"):
        attention_inputs("bikes", SMALL, head_dim=63)
    with pytest.raises(ValueError, match="heads"):
        attention_inputs("bikes", SMALL, heads=0)
    with pytest.raises(TypeError, match="dtype"):
        attention_inputs("bikes", SMALL, dtype=torch.int32)
    with pytest.raises(ValueError, match="temperature"):
        attention_inputs("bikes", SMALL, temperature=0)
    with pytest.raises(ValueError, match="layout.frames"):
        attention_inputs("bikes", VideoLayout(frames=30, height=2, width=2), stride=10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu = attention_inputs("bigbuckbunny", SMALL)
    gpu = attention_inputs("bigbuckbunny", SMALL, device="cuda")
    for c, g in zip(cpu, gpu):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), c, rtol=1e-3, atol=1e-3)
