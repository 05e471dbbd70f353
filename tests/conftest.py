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


@pytest.fixture(params=["one_pass", "gathered"])
def kernel_path(request, monkeypatch):
    """Runs a Triton attention test through each kernel path: the one-pass kernels (short histories: by default up
    to 16 selection blocks) and the gathered kernels (longer histories), forced for these short test lengths."""
    from blossomrec_hf.model import blossom_attention_triton as backend
    monkeypatch.setitem(backend.TUNING, "one_pass_max_blocks", 64 if request.param == "one_pass" else 0)
    return request.param
