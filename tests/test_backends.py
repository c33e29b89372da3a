"""The public ``sparse_attention`` gives the same result on every backend (Triton under the
interpreter on the CPU), including broadcast plans and strided inputs."""

import pytest
import torch
import torch.nn.functional as F

import sparsevid as sv

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method", ["window", "draft"])  # broadcast (1, 1) and per-head plans
def test_triton_backend_equals_oracle(method):
    layout = sv.VideoLayout(frames=2, height=5, width=7, text_tokens=9, text_first=True, tile=(4, 4), block_size=16)
    B, H, L, D = 2, 2, layout.num_tokens, 64
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE).half().transpose(1, 2) for _ in range(3))  # strided view
    plan = sv.plan(q, k, layout, method=method, density=0.3)
    out = sv.sparse_attention(q, k, v, plan, backend="triton")
    oracle = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=plan.to_mask())
    assert out.device == q.device
    assert out.shape == (B, H, L, D) and out.dtype == torch.float16
    assert rel_err(out, oracle) < 2e-3
    assert rel_err(out, sv.sparse_attention(q, k, v, plan, backend="reference")) < 2e-3


def test_available_backends_on_cpu():
    assert {"reference", "flex"} <= set(sv.available_backends("cpu"))
