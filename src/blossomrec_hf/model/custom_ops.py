"""The package's PyTorch custom operators (the fused loss, RoPE and BlossomRec attention): one library, named after
the code it runs.

Custom operators are opaque to torch.compile: it traces their fake implementations (shapes and dtypes only) and
calls the real ones, so a compiled training step keeps the Triton kernels and needs no graph break. They run with
autocast off: their callers choose the operands' dtype (autocast would otherwise reach the PyTorch operations inside
them in eager mode, but not in a compiled graph).

transformers loads a checkpoint's remote code under module names of its own, so the installed package and a
checkpoint's copy of these files can both run in one process, and torch.library refuses to define an operator twice.
The library's name therefore carries a hash of the files the operators run: a copy with the same code finds its
operators already defined and uses them; a copy that differs (saved by another version) defines its own instead of
silently running the other version's kernels.

Float32 operands: the Triton kernels' dot products follow torch.get_float32_matmul_precision(): "highest" (torch's
default) keeps every product exact on the CUDA cores, which Triton runs far below the tensor cores' rate; "high"
splits each operand into three TF32 parts on the tensor cores (float32-level accuracy; cuBLAS takes one TF32 pass
at "high"); "medium" takes one TF32 pass. 16-bit operands always run on the tensor cores as they are.
"""

import functools
import hashlib
import os
from pathlib import Path

import torch

OPERATOR_FILES = ("custom_ops.py", "chunked_cross_entropy.py", "fused_cross_entropy.py",
                  "triton_cross_entropy_kernels.py", "rotary_embedding.py", "triton_rotary_kernels.py",
                  "blossom_attention_triton.py", "triton_blossom_kernels.py", "sparse_patterns.py",
                  "varlen_flash_attention.py", "tile_fitting.py", "block_compressor.py", "history_layout.py",
                  "triton_compressor_kernels.py")
LIBRARY = "blossomrec_" + hashlib.sha256(
    b"".join((Path(__file__).parent / name).read_bytes() for name in OPERATOR_FILES)).hexdigest()[:12]


FLOAT32_DOT_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def dot_precision(dtype: torch.dtype) -> str:
    """Triton's `input_precision` for dot products of operands in `dtype` (read when a kernel launches, so a compiled
    graph follows the setting of its call, not of its tracing)."""
    if dtype != torch.float32:
        return "tf32"  # not read for 16-bit operands
    return FLOAT32_DOT_PRECISION[torch.get_float32_matmul_precision()]


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1): the kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_run_on(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels can take this tensor's device: CUDA, or any under the interpreter (callers also
    check that triton imports)."""
    return tensor.is_cuda or triton_interpreting()


def compute_dtype(*tensors) -> torch.dtype:
    """One dtype for an operator's operands, chosen by its caller (operators run with autocast off): autocast's where
    it is on, else the widest of the inputs."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def define_op(name: str, impl, fake, backward=None, setup_context=None) -> "Operator":
    """torch.ops.LIBRARY.name, defined from `impl` (typed arguments give the schema; no input is mutated) and `fake`,
    with `backward` as its autograd formula, unless a copy of the same code has defined it already; returned with
    its eager path (`Operator`)."""
    namespace, impl = getattr(torch.ops, LIBRARY), _without_autocast(impl)
    if not hasattr(namespace, name):
        qualified_name = f"{LIBRARY}::{name}"
        torch.library.custom_op(qualified_name, impl, mutates_args=())
        torch.library.register_fake(qualified_name, fake)
        if backward is not None:
            torch.library.register_autograd(qualified_name, backward, setup_context=setup_context)
    return Operator(getattr(namespace, name), impl, backward, setup_context)


class Operator:
    """A custom operator and its eager path. Compiling (torch.compile, torch.export), a call goes to the operator
    `op`, which the compiler traces by its fake implementation. Eager, the same implementation and autograd formula
    run as a plain autograd.Function (or directly, where no input needs a gradient): torch.library's Python dispatch
    (argument defaults, autocast and dynamo guards, redispatch) cost ~100 us a call on a CPU (benchmarks/
    host_overhead.py), several times what the kernels it launches take at short lengths."""

    def __init__(self, op, impl, backward=None, setup_context=None):
        self.op, self.impl = op, impl
        self.function = None if backward is None else type(f"{op.__name__}_eager", (torch.autograd.Function,), dict(
            forward=staticmethod(_eager_forward(impl, setup_context)), backward=staticmethod(backward)))

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        # traced (dynamo, or AOT tracing with fake or functional tensors, as opcheck does), under torch.func
        # transforms or on meta tensors: the operator, whose fake implementation serves them
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or not all(
                type(t) in _PLAIN_TENSORS and not t.is_meta for t in tensors):
            return self.op(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            # an operator without an autograd formula (a backward, differentiated by a double backward) refuses as
            # the operator does, rather than returning results that no gradient flows through
            return self.op(*args) if self.function is None else self.function.apply(*args)
        return self.impl(*args)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _eager_forward(impl, setup_context):
    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    return forward


def _without_autocast(impl):
    """impl with autocast off, so that its callers choose the operands' dtypes (only entered where autocast is on)."""
    @functools.wraps(impl)
    def run(*args):
        if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
            return impl(*args)
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return impl(*args)

    return run
