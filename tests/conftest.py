"""Test-session setup.

Triton kernels run under the Triton interpreter wherever no CUDA device is present (CI, laptops);
the variable must be set before triton is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets one intra-op thread: with as many workers as cores, more
# threads only spin-wait on each other (small ops ran up to 50x slower on 2 shared cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _nothing_left_applied():
    """A test that fails between ``sparsevid.apply`` and ``remove()`` (its frames keep the model alive) would leave
    diffusers' attention backends wrapped for every later test of its worker: remove what is still applied."""
    yield
    import sys

    routes = getattr(sys.modules.get("sparsevid.integrations.diffusers"), "_DispatchRoutes", None)
    if routes is not None and len(routes.users):
        import sparsevid as sv

        for model in list(routes.users):
            sv.remove(model)
