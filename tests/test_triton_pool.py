"""The Triton pooling kernel (draft planner) equals its PyTorch twin (interpreter on the CPU)."""

import pytest
import torch

import sparsevid as sv
from sparsevid.kernels.pooling import pool_blocks_reference

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.float16, 96)])
def test_pool_kernel_matches_reference(dtype, head_dim):
    from sparsevid.kernels.triton_pool import pool_blocks_triton

    layout = sv.VideoLayout(frames=2, height=5, width=7, text_tokens=9, tile=(4, 4), block_size=32)
    x = torch.randn(2, layout.num_tokens, 3, head_dim).to(DEVICE, dtype).transpose(1, 2)  # (B, H, L, D) strided
    tables = layout.on(DEVICE)
    got = pool_blocks_triton(x, tables.perm, tables.block_tokens, layout.block_size)
    want = pool_blocks_reference(x, layout)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the reference is the plain mean over each block's tokens
    block = 1
    tokens = layout.perm.view(layout.num_blocks, -1)[block]
    torch.testing.assert_close(want[:, :, block], x[:, :, tokens[tokens >= 0]].float().mean(2), rtol=1e-5, atol=1e-5)
