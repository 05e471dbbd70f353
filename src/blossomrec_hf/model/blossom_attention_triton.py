"""Fused Triton BlossomRec attention (`attn_implementation="blossom_triton"`).

Triton is optional: the model imports this module where triton is missing and only refuses the backend.
"""

try:
    import triton  # noqa: F401
except ImportError:
    triton = None


def triton_unavailable_reason() -> str | None:
    """Why `blossom_triton` cannot be selected here, or None when it can."""
    if triton is None:
        return "triton is not installed (pip install triton)"
    return "the fused Triton kernels are not part of this version yet; use attn_implementation='blossom_torch'"


def blossom_attention_triton(q, k, v, ck, cv, geometry):
    raise NotImplementedError(triton_unavailable_reason())
