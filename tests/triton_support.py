"""When the Triton kernel tests can run here: triton installed, and an interpreter that works with this numpy.

Triton 3.6's interpreter converts loop bounds with `int()` on one-element arrays, which numpy 2.4 refuses ("only
0-dimensional arrays can be converted to Python scalars"); triton 3.7 squeezes them first. Compiled kernels on a GPU
are not affected, so only the CPU interpreter needs the newer triton (the `test` extra asks for it).
"""

import os

import numpy
import pytest

try:
    import triton
except ImportError:
    triton = None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def triton_test_skip_reason() -> str | None:
    if triton is None:
        return "triton is not installed (pip install -e '.[test]')"
    if os.environ.get("TRITON_INTERPRET") == "1" and _version(triton.__version__) < (3, 7) \
            and _version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__}: "
                f"pip install 'triton>=3.7' (or 'numpy<2.4')")
    return None


requires_triton = pytest.mark.skipif(triton_test_skip_reason() is not None, reason=str(triton_test_skip_reason()))
