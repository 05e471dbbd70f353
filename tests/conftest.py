"""Shared test setup.

Triton reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any test imports the kernels:
the tests run the Triton kernels on CPU tensors through Triton's interpreter, on a GPU machine too (the GPU
correctness sweep is scripts/check_triton_attention.py).
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def script_module(path: str, name: str):
    """The script at `path` (from the repository root) imported as module `name`, for a fixture to `yield from`: tests
    call its functions in-process (a subprocess pays seconds of imports). It stays in sys.modules while the fixture
    holds it, since a dataclass looks its module up by name."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def prepare_data_script():
    yield from script_module("scripts/prepare_data.py", "prepare_data_script")


@pytest.fixture(params=["one_pass", "gathered"])
def kernel_path(request, monkeypatch):
    """Runs a Triton attention test through each kernel path: the one-pass kernels (short histories: by default up
    to 16 selection blocks) and the gathered kernels (longer histories), forced for these short test lengths."""
    from blossomrec_hf.model import blossom_attention_triton as backend
    monkeypatch.setitem(backend.TUNING, "one_pass_max_blocks", 64 if request.param == "one_pass" else 0)
    return request.param
