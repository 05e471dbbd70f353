"""Shared test setup.

Triton reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any test imports the kernels:
the tests run the Triton kernels on CPU tensors through Triton's interpreter, on a GPU machine too (the GPU
correctness sweep is scripts/check_triton_attention.py).
"""

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def prepare_data_script():
    """scripts/prepare_data.py as a module, so tests call its main() in-process (a subprocess pays seconds of
    imports)."""
    spec = importlib.util.spec_from_file_location("prepare_data_script", REPO_ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
