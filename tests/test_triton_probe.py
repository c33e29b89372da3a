"""The tail decision's probe pass (``kernels.triton_probe``) and its PyTorch twin against a float64 oracle.

On the CPU the kernel runs under the Triton interpreter (tests/conftest.py): float32 and float16 (the interpreter's
bfloat16 tl.dot is wrong, so bfloat16 runs on CUDA only). Shapes that do not fill a tile: probe rows not a multiple
of 16, keys not a multiple of the key step, ranges split over the keys, a row that keeps no key, keys every row keeps
(group -1), keep tables that broadcast over batch or heads (each on its own), transposed (B, L, H, D) keys.
"""

import math

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


def inputs(B, H, P, L, D, dtype, table_bh, groups_bh, transposed, g, groups=7, text=True):
    qp = torch.randn(B, H, P, D, generator=g)
    if transposed:
        k, v = (torch.randn(B, L, H, D, generator=g).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(2))
    kept_groups = torch.rand(*table_bh, P, groups, generator=g) < 0.3
    kept_groups[..., 0, :] = False  # a probe row that keeps no group
    key_groups = torch.randint(0, groups, (*groups_bh, L), generator=g)
    if text:
        key_groups[..., : L // 10] = -1  # keys every row keeps (text keys)
    return qp.to(dtype), k.to(dtype), v.to(dtype), kept_groups, key_groups


def kept_mask(kept_groups, key_groups, B, H):
    """The (B, H, P, L) mask the tables stand for, built the slow way."""
    P, L = kept_groups.shape[2], key_groups.shape[2]
    mask = torch.zeros(B, H, P, L, dtype=torch.bool)
    table, groups = kept_groups.expand(B, H, P, -1), key_groups.expand(B, H, L)
    for b in range(B):
        for h in range(H):
            for n in range(L):
                mask[b, h, :, n] = True if groups[b, h, n] < 0 else table[b, h, :, groups[b, h, n]]
    return mask


CASES = [  # B, H, P, L, D, dtype, kept_groups' (B', H'), key_groups' (B', H'), transposed k/v, keys all rows keep
    (2, 2, 5, 100, 32, torch.float32, (2, 2), (2, 2), False, True),
    (1, 3, 32, 77, 64, torch.float16, (1, 3), (1, 1), True, False),
    (2, 2, 17, 130, 48, torch.float16, (1, 1), (2, 1), False, True),
    (2, 1, 8, 16, 16, torch.float32, (1, 1), (1, 1), True, False),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_and_twin_match_the_oracle(case):
    B, H, P, L, D, dtype, table_bh, groups_bh, transposed, text = CASES[case]
    g = torch.Generator().manual_seed(case)
    qp, k, v, kept_groups, key_groups = inputs(B, H, P, L, D, dtype, table_bh, groups_bh, transposed, g, text=text)
    scale = 0.8 / D ** 0.5
    exact, kept_out, kept_lse = oracle(qp, k, v, kept_mask(kept_groups, key_groups, B, H), scale)
    on = (t.to(DEVICE) for t in (qp, k, v, kept_groups, key_groups))
    for name, got in (("triton", probe_partials_triton(*on, scale)),
                      ("reference", probe_partials_reference(qp.float(), k, v, kept_groups, key_groups, scale))):
        e, o, lse = (t.double().cpu() for t in got)
        tol = TOL[dtype] if name == "triton" else 1e-5
        assert ((e - exact).norm() / exact.norm()).item() < tol, name
        assert ((o - kept_out).norm() / kept_out.norm()).item() < tol, name
        assert torch.equal(torch.isinf(lse), torch.isinf(kept_lse)), name  # -inf exactly where nothing is kept
        finite = torch.isfinite(kept_lse)
        assert torch.allclose(lse[finite], kept_lse[finite], atol=10 * tol), name
        if not text:  # the first row keeps no key: zero with -inf
            assert torch.all(o[..., 0, :] == 0) and torch.all(lse[..., 0] == float("-inf")), name
    assert ((kept_out - exact).norm() / exact.norm()).item() > 0.1  # the tables matter: the test can tell


def test_the_kernel_refuses_what_it_cannot_run():
    qp, k, v, kept_groups, key_groups = (t.to(DEVICE) for t in inputs(
        1, 1, 4, 32, 32, torch.float32, (1, 1), (1, 1), False, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="head_dim"):
        probe_partials_triton(qp[..., :24], k[..., :24], v[..., :24], kept_groups, key_groups, 1.0)
    with pytest.raises(ValueError, match="kept_groups"):
        probe_partials_triton(qp, k, v, kept_groups[..., :2, :], key_groups, 1.0)
    with pytest.raises(ValueError, match="kept_groups"):
        probe_partials_triton(qp, k, v, kept_groups.int(), key_groups, 1.0)
    with pytest.raises(ValueError, match="key_groups"):
        probe_partials_triton(qp, k, v, kept_groups, key_groups[..., :16], 1.0)
    with pytest.raises(ValueError, match="key_groups"):
        probe_partials_reference(qp, k, v, kept_groups, key_groups.float(), 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        probe_partials_triton(qp.half(), k, v, kept_groups, key_groups, 1.0)


@pytest.mark.skipif(not CUDA, reason="bf16 tl.dot is wrong under the Triton interpreter; the dispatch needs CUDA")
def test_cuda_bf16_through_the_dispatch():
    """``probe_partials`` on CUDA takes the kernel (float32 rows given, keys in bf16) and matches the twin."""
    qp, k, v, kept_groups, key_groups = inputs(2, 4, 32, 4099, 128, torch.bfloat16, (2, 4), (2, 1), True,
                                               torch.Generator().manual_seed(3), groups=300)
    qp, k, v, kept_groups, key_groups = (t.cuda() for t in (qp.float(), k, v, kept_groups, key_groups))
    got = probe_partials(qp, k, v, kept_groups, key_groups, 128 ** -0.5)
    ref = probe_partials_reference(qp, k, v, kept_groups, key_groups, 128 ** -0.5)
    for a, b in zip(got[:2], ref[:2]):
        assert ((a - b).norm() / b.norm()).item() < TOL[torch.bfloat16]
    finite = torch.isfinite(ref[2])
    assert torch.equal(finite, torch.isfinite(got[2])) and torch.allclose(got[2][finite], ref[2][finite], atol=0.05)


_COMPILE = """
from sparsevid.kernels import triton_probe as tp

pointers = dict(Q="*bf16", K="*bf16", V="*bf16", Kept="*i1", Group="*i64", Out="*fp32", Lse="*fp32", sm_scale="fp32")
constants = dict(HEAD_DIM=128, HEAD_DIM_P=128, BLOCK_P=32, BLOCK_N=64)
kernel = build(tp._probe_fwd, pointers, constants, num_warps=4, num_stages=2)
print("compiled", kernel.metadata.shared)
f32 = "*fp32"
pointers = dict(Q="*bf16", Out=f32, Lse=f32, KMeans=f32, VMeans=f32, LogN=f32, Kept="*i1", Weight=f32, Errors=f32,
                sm_scale="fp32", LOG_STEP="fp32")
constants = dict(HEAD_DIM=128, HEAD_DIM_P=128, BLOCK_P=32, BLOCK_T=64, WEIGHTS=9)
print("compiled", build(tp._cluster_decide, pointers, constants, num_warps=4).metadata.shared)
"""


def test_compiles_for_hopper():
    """The interpreter runs what the compiler may refuse: the probe pass (bfloat16) and the cluster decision
    (float32 dots in IEEE precision) compile for sm_90 with the ptxas Triton ships (no GPU needed; a process
    without the interpreter)."""
    from sm90 import compile_sm90

    assert compile_sm90(_COMPILE).stdout.count("compiled") == 2


# ------------------------------------------------------------------------------ the cluster tail's decision
def _cluster_case(density, dtype, seed):
    import sparsevid as sv

    layout = sv.VideoLayout(2, 6, 8, text_tokens=7)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, layout.num_tokens, 32, generator=g) for _ in range(3))
    k[:, 1] *= 3.0  # one head with sharper attention: options scored further apart
    plan = sv.plan(q, k, layout, "clustered", density=density, q_clusters=6, k_clusters=10)
    return plan, q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="bf16 tl.dot is wrong under the Triton interpreter"))])
def test_cluster_decision_kernel_matches_its_pytorch_twin(dtype):
    """The decision kernel's option errors against ``option_errors`` on the PyTorch path's partials, and its weight
    is the first minimum of its own errors (dropping first); on every head here some weight beats dropping."""
    from sparsevid.cluster_plan import cluster_means
    from sparsevid.kernels.triton_probe import decide_cluster_triton
    from sparsevid.tail import cluster_tail_partials, option_errors, probe_rows

    plan, q, k, v = _cluster_case(0.25, dtype, 0)
    lo = plan.video_offset
    rows = probe_rows(plan.layout, 16, "cpu", lo, lo + plan.layout.video_tokens)[0] + lo
    kept = plan.kept_of_rows(rows, name="test")
    means = cluster_means(k, plan), cluster_means(v, plan)
    scale = 32 ** -0.5
    on = (t.to(DEVICE) for t in (q[:, :, rows], k, v, kept, plan.k_labels(), *means, plan.log_k_sizes))
    qp, kd, vd, kept_d, labels, km, vm, log_n = on
    weight, errors = decide_cluster_triton(qp, kd, vd, kept_d, labels, (km, vm), log_n, scale)

    ref = option_errors(*cluster_tail_partials(q[:, :, rows].float(), k, v, kept, plan, means, scale))  # (1 + W, B, H)
    got = errors.cpu().permute(2, 0, 1)
    assert torch.allclose(got, ref, rtol=TOL[dtype] * 10, atol=1e-6), (got, ref)
    best = got.argmin(0)
    expect = torch.where(best == 0, -torch.inf, (best - 1).float() * (-0.5 * math.log(2.0)))
    assert torch.equal(weight.cpu(), expect)
    assert (best > 0).all()  # the tail pays on these heads: the test sees a weight, not only dropping


def test_cluster_decision_kernel_drops_when_nothing_is_dropped():
    """Every cluster kept: the tail is empty, every option scores as dropping, and the tie goes to dropping."""
    from sparsevid.cluster_plan import cluster_means
    from sparsevid.kernels.triton_probe import decide_cluster_triton
    from sparsevid.tail import probe_rows

    plan, q, k, v = _cluster_case(1.0, torch.float32, 1)
    assert bool(plan.kept_clusters().all())
    lo = plan.video_offset
    rows = probe_rows(plan.layout, 16, "cpu", lo, lo + plan.layout.video_tokens)[0] + lo
    args = (q[:, :, rows], k, v, plan.kept_of_rows(rows, name="t"), plan.k_labels(), cluster_means(k, plan),
            cluster_means(v, plan), plan.log_k_sizes)
    qp, kd, vd, kept, labels, km, vm, log_n = (t.to(DEVICE) for t in args)
    weight, errors = decide_cluster_triton(qp, kd, vd, kept, labels, (km, vm), log_n, 32 ** -0.5)
    assert torch.all(weight == -torch.inf)
    assert torch.equal(errors, errors[..., :1].expand_as(errors))
