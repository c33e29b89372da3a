"""Test-session setup.

Triton kernels run under the Triton interpreter wherever no CUDA device is present (CI, laptops);
the variable must be set before triton is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
