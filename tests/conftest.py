"""Shared test setup.

Triton reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any test imports the kernels:
the tests run the Triton kernels on CPU tensors through Triton's interpreter, on a GPU machine too (the GPU
correctness sweep is scripts/check_triton_attention.py).
"""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
