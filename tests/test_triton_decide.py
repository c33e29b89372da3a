"""FastCar's fused decision kernel (``decoder.triton_decide``) against the PyTorch decision it replaces.

On the CPU the kernel runs under the Triton interpreter (tests/conftest.py): grouped query heads, rows before the
first full frame (never replayed), query tensors strided as RoPE leaves them, thresholds between the scores so
both outcomes occur.
"""

import pytest
import torch

pytest.importorskip("triton")

from sparsevid.decoder.fastcar_graph import _decide  # noqa: E402
from sparsevid.decoder.triton_decide import decide_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B, H, KVH, T, D, P, start, dtype", [
    (1, 4, 2, 1, 16, 8, 11, torch.float32),  # a decode step (batch 1, one row)
    (2, 6, 3, 5, 32, 4, 2, torch.float16),  # rows on both sides of the first frame, GQA of 2
    (3, 8, 8, 7, 64, 6, 9, torch.float32),  # one key head per query head
    pytest.param(2, 32, 8, 1, 64, 64, 100, torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="bfloat16 on CUDA (the interpreter is tested in float16/float32)")),  # llama3.2-1b
])
def test_matches_the_pytorch_decision(B, H, KVH, T, D, P, start, dtype):
    g = torch.Generator().manual_seed(B * 100 + T)
    q = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)  # (B, H, T, D), strided as after RoPE
    k_cache = torch.randn(B, KVH, max(32, start + T), D, generator=g).to(dtype)  # a slot for every position
    positions = torch.arange(start, start + T)
    scale = D ** -0.5
    k_prev = k_cache.index_select(2, (positions - P).clamp(min=0))
    ref_tas, _ = _decide(q, k_prev, (positions >= P)[None].expand(B, T), torch.tensor(float("inf")), scale)
    threshold = ref_tas.median().reshape(1)  # half the eligible rows on each side
    ref_tas, ref_replay = _decide(q, k_prev, (positions >= P)[None].expand(B, T), threshold, scale)
    tas, replay = decide_triton(q.to(DEVICE), k_cache.to(DEVICE), positions.to(DEVICE), P, threshold.to(DEVICE),
                                scale)
    assert tas.shape == (B, T) and replay.dtype == torch.bool
    assert torch.allclose(tas.cpu(), ref_tas, atol=1e-5, rtol=1e-4)
    near = (ref_tas - threshold).abs() < 1e-5  # summation order may flip an exact tie
    assert torch.equal(replay.cpu()[~near], ref_replay[~near])
    assert not replay.cpu()[:, positions < P].any()  # before the first full frame nothing replays
    if (positions >= P).sum() > 1:
        assert replay.any() and not replay.cpu()[:, positions >= P].all()  # the threshold splits: the test can tell


def test_refuses_mismatched_cache_and_positions():
    q = torch.randn(1, 4, 2, 16).to(DEVICE)
    with pytest.raises(ValueError, match="k_cache"):
        decide_triton(q, torch.randn(1, 3, 8, 16).to(DEVICE), torch.arange(2).to(DEVICE), 4,
                      torch.zeros(1).to(DEVICE), 0.25)
    with pytest.raises(ValueError, match="positions"):
        decide_triton(q, torch.randn(1, 2, 8, 16).to(DEVICE), torch.arange(3).to(DEVICE), 4,
                      torch.zeros(1).to(DEVICE), 0.25)


_COMPILE = """
from sparsevid.decoder import triton_decide as td

pointers = dict(Q="*bf16", KCache="*bf16", Pos="*i64", Thr="*fp32", Tas="*fp32", Replay="*u8", scale="fp32")
kernel = build(td._decide_kernel, pointers, dict(BLOCK_H=32, BLOCK_D=64, HEAD_DIM=64), num_warps=4)
print("compiled", kernel.metadata.shared)
"""


def test_compiles_for_hopper():
    """The interpreter runs what the compiler may refuse: the kernel compiles for sm_90 in bfloat16 with the ptxas
    Triton ships (no GPU needed; a process without the interpreter)."""
    from sm90 import compile_sm90

    assert "compiled" in compile_sm90(_COMPILE).stdout
