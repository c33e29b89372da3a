"""The Triton block-sparse kernel against dense SDPA with the plan's token-level mask.

On CPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported), so shapes stay small. The oracle is built here from the CSR directly
(not from plan.py), in float64.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsevid.kernels.triton_blocksparse import block_sparse_attn, sparse_attention_triton  # noqa: E402
from sparsevid.layout import VideoLayout  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def random_csr(B, H, NB, density, generator, max_kept=None, expand=None):
    """A random plan: every query block keeps itself plus random others; indices ascending, garbage tail."""
    max_kept = max_kept or NB
    num = torch.empty(B, H, NB, dtype=torch.int32)
    idx = torch.full((B, H, NB, max_kept), -7, dtype=torch.int32)  # garbage tail
    for b in range(B):
        for h in range(H):
            for m in range(NB):
                keep = torch.rand(NB, generator=generator) < density
                keep[m] = True
                kept = torch.nonzero(keep).squeeze(1)[:max_kept]
                if m not in kept:
                    kept[-1] = m
                    kept = kept.sort().values
                num[b, h, m] = kept.numel()
                idx[b, h, m, : kept.numel()] = kept.int()
                idx[b, h, m, kept.numel():] = torch.randint(0, 10_000, (max_kept - kept.numel(),), generator=generator).int()
    if expand == "heads":
        num, idx = num[:, :1].expand(B, H, NB), idx[:, :1].expand(B, H, NB, max_kept)
    elif expand == "batch":
        num, idx = num[:1].expand(B, H, NB), idx[:1].expand(B, H, NB, max_kept)
    return num, idx


def token_mask(perm, num, idx, block_size, L):
    """bool (B, H, L, L), original order, True = computed; built straight from the CSR."""
    B, H, NB = num.shape
    mask = torch.zeros(B, H, L, L, dtype=torch.bool)
    blocks = perm.view(NB, block_size)
    for b in range(B):
        for h in range(H):
            for m in range(NB):
                rows = blocks[m][blocks[m] >= 0]
                for n in idx[b, h, m, : num[b, h, m]].tolist():
                    cols = blocks[n][blocks[n] >= 0]
                    mask[b, h, rows[:, None], cols[None, :]] = True
    return mask


def oracle(q, k, v, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), attn_mask=mask, scale=scale
    )


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


TOL = {torch.float32: 2e-3 if CUDA else 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

SMALL = dict(frames=2, height=5, width=7, tile=(4, 4), block_size=16)


def make(layout, B, H, D, dtype, seed, density=0.4, transposed=False, expand=None):
    g = torch.Generator().manual_seed(seed)
    L = layout.num_tokens
    shape = (B, L, H, D) if transposed else (B, H, L, D)
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    if transposed:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    num, idx = random_csr(B, H, layout.num_blocks, density, g, expand=expand)
    return q, k, v, num, idx


def run_kernel(layout, q, k, v, num, idx, scale, **kw):
    dev = lambda t: t.to(DEVICE)  # noqa: E731  (.to keeps an expanded view's strides only on CPU)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    if DEVICE == "cpu":
        perm, num_d, idx_d = layout.perm, num, idx
    else:
        perm, num_d, idx_d = dev(layout.perm), _to_dev_keep_view(num), _to_dev_keep_view(idx)
    return sparse_attention_triton(q, k, v, perm, num_d, idx_d, layout.block_size, scale, **kw)


def _to_dev_keep_view(t):
    """Move to the device keeping stride-0 dims expanded (the kernel must honour those strides)."""
    if 0 in t.stride():
        base = t[tuple(slice(0, 1) if s == 0 else slice(None) for s in t.stride())].contiguous()
        return base.to(DEVICE).expand(t.shape)
    return t.to(DEVICE)


CASES = [
    # (layout kwargs, B, H, D, dtype, transposed, expand)
    (dict(SMALL, text_tokens=9, text_first=False), 2, 2, 64, torch.float32, False, None),
    (dict(SMALL, text_tokens=9, text_first=True), 2, 3, 128, torch.float32, False, None),
    (dict(SMALL), 2, 2, 64, torch.float16, True, None),
    (dict(SMALL, text_tokens=5, text_first=True), 2, 2, 128, torch.float16, False, "heads"),
    (dict(SMALL, text_tokens=20), 2, 2, 96, torch.float16, False, "batch"),
    (dict(frames=1, height=9, width=11, tile=(5, 6), block_size=32), 1, 2, 64, torch.float32, True, None),
    # text block of 9 real slots in 32: with BLOCK_N = 16 its second sub-tile is padding only
    (dict(frames=1, height=9, width=11, tile=(5, 6), block_size=32, text_tokens=9, text_first=True),
     1, 2, 64, torch.float16, False, None),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_dense_masked_sdpa(case):
    lk, B, H, D, dtype, transposed, expand = CASES[case]
    layout = VideoLayout(**lk)
    q, k, v, num, idx = make(layout, B, H, D, dtype, seed=case, transposed=transposed, expand=expand)
    scale = 1.0 / math.sqrt(D)
    out = run_kernel(layout, q, k, v, num, idx, scale)
    assert out.shape == q.shape and out.dtype == dtype
    ref = oracle(q, k, v, token_mask(layout.perm, num, idx, layout.block_size, layout.num_tokens), scale)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.skipif(not CUDA, reason="bf16 tl.dot is wrong under the Triton interpreter (CPU); checked on CUDA")
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_bf16_cuda(D, block_size):
    layout = VideoLayout(frames=3, height=13, width=21, text_tokens=40, block_size=block_size)
    q, k, v, num, idx = make(layout, 2, 3, D, torch.bfloat16, seed=D + block_size, transposed=True)
    scale = 0.7 / math.sqrt(D)
    out = run_kernel(layout, q, k, v, num, idx, scale)
    ref = oracle(q, k, v, token_mask(layout.perm, num, idx, layout.block_size, layout.num_tokens), scale)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_every_output_written_over_poison():
    layout = VideoLayout(**SMALL, text_tokens=3)
    q, k, v, num, idx = make(layout, 2, 2, 64, torch.float16, seed=11)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    run_kernel(layout, q, k, v, num, idx, 0.125, out=out)
    assert torch.isfinite(out).all()
    ref = oracle(q, k, v, token_mask(layout.perm, num, idx, layout.block_size, layout.num_tokens), 0.125)
    assert rel_err(out, ref) < TOL[torch.float16]


def test_dense_plan_equals_plain_sdpa():
    layout = VideoLayout(**SMALL, text_tokens=7)
    B, H, D, NB = 1, 2, 64, layout.num_blocks
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, layout.num_tokens, D, generator=g) for _ in range(3))
    num = torch.full((B, H, NB), NB, dtype=torch.int32)
    idx = torch.arange(NB, dtype=torch.int32).expand(B, H, NB, NB)
    out = run_kernel(layout, q, k, v, num, idx, D**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert rel_err(out, ref) < TOL[torch.float32]


def test_wrong_plan_is_detected():
    """The oracle is sensitive: running a different plan than the mask's must fail the check."""
    layout = VideoLayout(**SMALL)
    q, k, v, num, idx = make(layout, 1, 2, 64, torch.float32, seed=5, density=0.3)
    mask = token_mask(layout.perm, num, idx, layout.block_size, layout.num_tokens)
    g = torch.Generator().manual_seed(99)
    num2, idx2 = random_csr(1, 2, layout.num_blocks, 0.3, g)
    out = run_kernel(layout, q, k, v, num2, idx2, 0.125)
    assert rel_err(out, oracle(q, k, v, mask, 0.125)) > 1e-2
    out_ok = run_kernel(layout, q, k, v, num, idx, 0.125)
    assert rel_err(out_ok, oracle(q, k, v, mask, 0.125)) < TOL[torch.float32]


def test_custom_op_registered_and_fake():
    layout = VideoLayout(**SMALL)
    q, k, v, num, idx = make(layout, 1, 2, 64, torch.float32, seed=8)
    op = torch.ops.sparsevid.block_sparse_attn
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    perm, num, idx = layout.perm.to(DEVICE), num.to(DEVICE), idx.to(DEVICE)
    out = op(q, k, v, perm, num, idx, layout.block_size, 0.125)
    ref = sparse_attention_triton(q, k, v, perm, num, idx, layout.block_size, 0.125)
    torch.testing.assert_close(out, ref)
    torch.library.opcheck(block_sparse_attn, (q, k, v, perm, num, idx, layout.block_size, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not CUDA, reason="torch.compile + CUDA graphs need CUDA")
def test_compile_fullgraph_and_cuda_graph():
    layout = VideoLayout(frames=2, height=16, width=16, text_tokens=64)
    q, k, v, num, idx = make(layout, 1, 4, 128, torch.bfloat16, seed=1, transposed=True)
    q, k, v = (t.cuda() for t in (q, k, v))
    perm, num, idx = layout.perm.cuda(), num.cuda(), idx.cuda()
    ref = block_sparse_attn(q, k, v, perm, num, idx, layout.block_size, 0.1)

    def f(q, k, v):
        return torch.ops.sparsevid.block_sparse_attn(q * 1.0, k, v, perm, num, idx, layout.block_size, 0.1) + 0

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    graph = torch.cuda.CUDAGraph()
    static = torch.empty_like(ref)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        block_sparse_attn(q, k, v, perm, num, idx, layout.block_size, 0.1)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        static.copy_(block_sparse_attn(q, k, v, perm, num, idx, layout.block_size, 0.1))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static, ref)
