"""The predicated Llama-MLP kernels (FastCar's skip inside a CUDA graph) equal their PyTorch twin on
the rows that run and leave skipped rows untouched (interpreter on the CPU: float32 and float16)."""

import pytest
import torch

pytest.importorskip("triton")
from sparsevid.decoder.triton_mlp import predicated_mlp, predicated_mlp_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)
C, I = 48, 80  # neither a multiple of the column nor of the K tile: the edge masks run too
N_TILES = 70  # three 32-row tiles under the interpreter (one 16-row tile up to 16 rows)


def weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(I, C, generator=g) / C**0.5, torch.randn(I, C, generator=g) / C**0.5,
         torch.randn(C, I, generator=g) / I**0.5]
    return [t.to(DEVICE, dtype) for t in w]


def patterns(n):
    """Named skip masks (True = replayed) of ``n`` rows."""
    g = torch.Generator().manual_seed(n)
    rows = torch.arange(n)
    out = {"all replayed": torch.ones(n, dtype=torch.bool), "none replayed": torch.zeros(n, dtype=torch.bool),
           "mixed": torch.rand(n, generator=g) < 0.5}
    if n > 32:
        out["compacted (device count 37)"] = rows >= 37  # kept rows first, as the decoder sorts them
        out["one whole tile replayed"] = ((rows >= 32) & (rows < 64)) | (torch.rand(n, generator=g) < 0.3)
    return out


CASES = [(n, name) for n in (1, 6, N_TILES) for name in patterns(n)]


# the interpreter's dot is wrong in bfloat16; on the GPU the decoder's dtype (one dtype: autotuning compiles per dtype)
DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,pattern", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_predicated_mlp_runs_kept_rows_and_leaves_replayed_rows(dtype, n, pattern):
    wg, wu, wd = weights(dtype)
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(n, 2 * C, generator=g).to(DEVICE, dtype)
    x = wide[:, ::2]  # any strides
    skip = patterns(n)[pattern].to(DEVICE)
    cached = torch.randn(n, C, generator=g).to(DEVICE, dtype)  # the outputs one frame earlier
    got = predicated_mlp(x, skip, wg, wu, wd, cached.clone())
    want = predicated_mlp_reference(x, skip, wg, wu, wd, cached.clone())
    assert torch.equal(got[skip], cached[skip])  # replayed rows: untouched, bit for bit
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]
    torch.testing.assert_close(got[~skip], want[~skip], **tol)
    # the uint8 mask the decoder may pass is the same mask
    assert torch.equal(predicated_mlp(x, skip.to(torch.uint8), wg, wu, wd, cached.clone()), got)


def test_reference_twin_is_the_llama_mlp():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=C, intermediate_size=I, num_attention_heads=4, num_key_value_heads=4)
    mlp = transformers.models.llama.modeling_llama.LlamaMLP(config).to(DEVICE)
    x = torch.randn(5, C, device=DEVICE)
    skip = torch.tensor([False, True, False, False, True], device=DEVICE)
    got = predicated_mlp_reference(x, skip, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                   torch.zeros(5, C, device=DEVICE))
    with torch.no_grad():
        torch.testing.assert_close(got[~skip], mlp(x[~skip]), rtol=1e-5, atol=1e-6)
    assert not got[skip].any()
