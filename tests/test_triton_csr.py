"""The mask-to-CSR kernel against its PyTorch twin (CPU: the Triton interpreter)."""

import pytest
import torch

pytest.importorskip("triton")

from sparsevid.plan import _dense_to_csr  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n,width", [(7, 7), (37, 37), (64, 20), (300, 300)])
def test_mask_to_csr_matches_twin(n, width):
    from sparsevid.kernels.triton_csr import mask_to_csr_triton

    g = torch.Generator().manual_seed(n)
    keep = torch.rand(2, 3, 5, n, generator=g) < 0.3
    keep[..., 0] = True
    counts, indices = mask_to_csr_triton(keep.to(DEVICE), width)
    want_counts, want_indices = _dense_to_csr(keep, width)  # CPU: the PyTorch twin
    assert torch.equal(counts.cpu(), want_counts)
    listed = torch.arange(width) < want_counts.clamp(max=width).unsqueeze(-1)
    assert torch.equal(indices.cpu()[listed], want_indices[listed])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton path of the planners' CSR builder is CUDA only")
@pytest.mark.parametrize("n", [37, 9000])  # 9000: past MAX_COLUMNS, the PyTorch twin on the GPU
def test_planners_csr_builder_matches_twin_on_cuda(n):
    from sparsevid.kernels.csr import dense_to_csr

    keep = torch.rand(1, 2, 3, n, generator=torch.Generator().manual_seed(n)) < 0.3
    counts, indices = dense_to_csr(keep.cuda(), n)
    want_counts, want_indices = _dense_to_csr(keep, n)
    assert torch.equal(counts.cpu(), want_counts) and torch.equal(indices.cpu(), want_indices)
