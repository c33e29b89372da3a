"""The tail decision's probe pass (``kernels.triton_probe``) and its PyTorch twin against a float64 oracle.

On the CPU the kernel runs under the Triton interpreter (tests/conftest.py): float32 and float16 (the interpreter's
bfloat16 tl.dot is wrong, so bfloat16 runs on CUDA only). Shapes that do not fill a tile: probe rows not a multiple
of 16, keys not a multiple of the key step, ranges split over the keys, a row that keeps no key, keep masks that
broadcast over batch or heads, transposed (B, L, H, D) keys.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsevid.kernels.triton_probe import probe_partials_triton  # noqa: E402
from sparsevid.tail import probe_partials, probe_partials_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-3 if CUDA else 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def oracle(qp, k, v, kept, scale):
    q, k, v = (t.double().cpu() for t in (qp, k, v))
    scores = q @ k.transpose(-1, -2) * scale
    exact = torch.softmax(scores, -1) @ v
    masked = scores.masked_fill(~kept.cpu(), float("-inf"))
    lse = torch.logsumexp(masked, -1)
    out = (torch.softmax(masked, -1).nan_to_num(0.0)) @ v  # a row keeping nothing: zero
    return exact, out, lse


def inputs(B, H, P, L, D, dtype, mask_bh, transposed, g):
    qp = torch.randn(B, H, P, D, generator=g)
    if transposed:
        k, v = (torch.randn(B, L, H, D, generator=g).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(2))
    kept = torch.rand(*mask_bh, P, L, generator=g) < 0.3
    kept[..., 0, :] = False  # a probe row that keeps no key
    return qp.to(dtype), k.to(dtype), v.to(dtype), kept


CASES = [  # B, H, P, L, D, dtype, keep mask's (B', H'), transposed k/v
    (2, 2, 5, 100, 32, torch.float32, (2, 2), False),
    (1, 3, 32, 77, 64, torch.float16, (1, 3), True),
    (2, 2, 17, 130, 48, torch.float16, (1, 1), False),
    (2, 1, 8, 16, 16, torch.float32, (1, 1), True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_and_twin_match_the_oracle(case):
    B, H, P, L, D, dtype, mask_bh, transposed = CASES[case]
    g = torch.Generator().manual_seed(case)
    qp, k, v, kept = inputs(B, H, P, L, D, dtype, mask_bh, transposed, g)
    scale = 0.8 / D ** 0.5
    exact, kept_out, kept_lse = oracle(qp, k, v, kept.expand(B, H, P, L), scale)
    for name, got in (("triton", probe_partials_triton(qp.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kept.to(DEVICE),
                                                      scale)),
                      ("reference", probe_partials_reference(qp.float(), k, v, kept, scale))):
        e, o, lse = (t.double().cpu() for t in got)
        tol = TOL[dtype] if name == "triton" else 1e-5
        assert ((e - exact).norm() / exact.norm()).item() < tol, name
        assert ((o - kept_out).norm() / kept_out.norm()).item() < tol, name
        assert torch.equal(torch.isinf(lse), torch.isinf(kept_lse)), name  # -inf exactly where nothing is kept
        finite = torch.isfinite(kept_lse)
        assert torch.allclose(lse[finite], kept_lse[finite], atol=10 * tol), name
        assert torch.all(o[..., 0, :] == 0), name
    assert ((kept_out - exact).norm() / exact.norm()).item() > 0.1  # the mask matters: the test can tell


def test_the_kernel_refuses_what_it_cannot_run():
    qp, k, v, kept = inputs(1, 1, 4, 32, 32, torch.float32, (1, 1), False, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="head_dim"):
        probe_partials_triton(qp[..., :24].to(DEVICE), k[..., :24].to(DEVICE), v[..., :24].to(DEVICE),
                              kept.to(DEVICE), 1.0)
    with pytest.raises(ValueError, match="kept_keys"):
        probe_partials_triton(qp.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kept[..., :16].to(DEVICE), 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        probe_partials_triton(qp.half().to(DEVICE), k.to(DEVICE), v.to(DEVICE), kept.to(DEVICE), 1.0)


@pytest.mark.skipif(not CUDA, reason="bf16 tl.dot is wrong under the Triton interpreter; the dispatch needs CUDA")
def test_cuda_bf16_through_the_dispatch():
    """``probe_partials`` on CUDA takes the kernel (float32 rows given, keys in bf16) and matches the twin."""
    qp, k, v, kept = inputs(2, 4, 32, 4099, 128, torch.bfloat16, (2, 4), True, torch.Generator().manual_seed(3))
    qp, k, v, kept = (t.cuda() for t in (qp.float(), k, v, kept))
    got = probe_partials(qp, k, v, kept, 128 ** -0.5)
    ref = probe_partials_reference(qp, k, v, kept, 128 ** -0.5)
    for a, b in zip(got[:2], ref[:2]):
        assert ((a - b).norm() / b.norm()).item() < TOL[torch.bfloat16]
    finite = torch.isfinite(ref[2])
    assert torch.equal(finite, torch.isfinite(got[2])) and torch.allclose(got[2][finite], ref[2][finite], atol=0.05)


_COMPILE = """
from sparsevid.kernels import triton_probe as tp

pointers = dict(Q="*bf16", K="*bf16", V="*bf16", Kept="*u8", Out="*fp32", Lse="*fp32", sm_scale="fp32")
constants = dict(HEAD_DIM=128, HEAD_DIM_P=128, BLOCK_P=32, BLOCK_N=64)
kernel = build(tp._probe_fwd, pointers, constants, num_warps=4, num_stages=2)
print("compiled", kernel.metadata.shared)
"""


def test_compiles_for_hopper():
    """The interpreter runs what the compiler may refuse: the kernel compiles for sm_90 in bfloat16 with the ptxas
    Triton ships (no GPU needed; a process without the interpreter)."""
    from sm90 import compile_sm90

    assert "compiled" in compile_sm90(_COMPILE).stdout
