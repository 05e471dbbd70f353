"""Shared test setup.

Triton reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any test imports the kernels:
without a GPU the Triton kernels then run on the CPU through Triton's interpreter.
"""

import os
import sys
from pathlib import Path

if not os.environ.get("CUDA_VISIBLE_DEVICES_FOR_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
sys.path.insert(0, str(REPO_ROOT / "src"))
