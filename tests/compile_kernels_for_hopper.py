"""Compiles every Triton kernel launch of the package for a Hopper GPU (sm_90) on a machine without a GPU.

The other tests run the kernels under Triton's interpreter, which executes them as Python and skips the compiler's
checks: a kernel can pass them all and still fail to compile on a GPU (a loop-carried variable whose type changed
did). Here the launch sites run on CPU tensors with each kernel replaced by a recorder; every distinct recorded launch
is then compiled with its argument types, constexprs and warps for sm_90 (not with the alignment specialisations
the JIT adds on a GPU). Prints a line per launch; exits 1 if any fails, 3 where this Triton's compiler entry points
differ from the ones used here. Run with TRITON_INTERPRET unset (`tests/test_kernel_compilation.py` does).
"""

import os
import sys

import torch
import triton

API_CHANGED = 3  # exit status where this Triton's compiler entry points differ from the ones used here
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError
except ImportError as error:
    print(f"triton {triton.__version__}: compiler API differs ({error})")
    sys.exit(API_CHANGED)

from blossomrec_hf.model import blossom_attention_triton as attention
from blossomrec_hf.model import fused_cross_entropy as loss
from blossomrec_hf.model import rotary_embedding as rotary

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
                 torch.int64: "*i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records the launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches(modules) -> list:
    launches = []
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.JITFunction):
                setattr(module, name, Recorder(value, launches))
    return launches


def argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise ValueError(f"no Triton type for {type(value).__name__}")


def source_of(kernel, args, kwargs) -> tuple[ASTSource, dict, tuple] | None:
    """The launch as the compiler takes it (a signature of types and constexpr values), its launch options, and a
    key that tells one specialisation from another; None where this Triton's ASTSource takes other arguments."""
    options = {key: kwargs.pop(key) for key in LAUNCH_OPTIONS if key in kwargs}
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constexprs = {}, {}
    for index, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = values[param.name]
        else:
            signature[param.name] = argument_type(values[param.name])
    key = (kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
    try:
        return ASTSource(fn=kernel, signature=signature, constexprs=constexprs), options, key
    except TypeError as error:
        print(f"triton {triton.__version__}: compiler API differs ({error})")
        return None


def attention_launches(dtype: torch.dtype, heads: int = 8, kv_heads: int = 2, dim: int = 16,
                       lengths=(200, 2000)) -> None:
    """Forward and backward of the attention, short (one-pass kernels) and long (gathered kernels), with and without
    compressed values."""
    geometry = (32, 16, 16, 4, 8)  # compress block, stride, selection block, selected blocks, STIS window
    for length in lengths:
        compressed = (length - 1) // 16
        q = torch.zeros(length, heads, dim, dtype=dtype)
        k, v = torch.zeros(2, length, kv_heads, dim, dtype=dtype)
        ck, cv = torch.zeros(2, compressed, kv_heads, dim, dtype=dtype)
        bounds = (torch.tensor([0, length], dtype=torch.int32), torch.tensor([0, compressed], dtype=torch.int32))
        for values in (cv, None):
            outputs = attention._forward(q, k, v, ck, values, *bounds, length, *geometry)
            attention._backward_impl(q, k, v, ck, values, *bounds, *outputs, *outputs[:3], length, *geometry)


def other_launches(dtype: torch.dtype) -> None:
    """The gated sum, rotary embedding and item-softmax loss kernels, forward and backward."""
    heads, length, dim = 8, 64, 16
    for branches in (2, 3):
        logits = torch.zeros(1, length, heads, branches, dtype=dtype)
        outputs = [torch.zeros(1, heads, length, dim, dtype=dtype) for _ in range(branches)]
        outputs += [None] * (3 - branches)
        attention._gated_forward(logits, *outputs)
        attention._gated_backward_impl(logits, *outputs, torch.zeros(1, heads, length, dim, dtype=dtype))
    query_key = torch.zeros(1, length, heads + 2, dim, dtype=dtype)
    cos, sin = torch.zeros(2, length, dim)
    rotary._forward(query_key, cos, sin, heads)
    rotary._backward_impl(query_key[:, :, :heads], query_key[:, :, heads:], cos, sin)
    hidden, weight = torch.zeros(256, 64, dtype=dtype), torch.zeros(1000, 64, dtype=dtype)
    targets = torch.zeros(256, dtype=torch.long)
    for hidden_grad in (True, False):
        _, lse, _ = loss._forward(hidden, weight, targets, -100, dtype, hidden_grad)
    loss._backward_impl(hidden, weight, targets, lse, torch.ones(()), -100, dtype)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run with TRITON_INTERPRET unset: the interpreter replaces the kernels this compiles")
    launches = record_launches([attention, rotary, loss])
    # bfloat16 as training runs them: the model's defaults, and a wide head with 8 query heads per kv head, whose tiles
    # are halved, on the long path; float32 at torch's "high" matmul precision, whose dots take three TF32 passes
    # (custom_ops.dot_precision; every variant costs ~2 s a launch)
    attention_launches(torch.bfloat16)
    attention_launches(torch.bfloat16, heads=8, kv_heads=1, dim=128, lengths=(2000,))
    other_launches(torch.bfloat16)
    default_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        attention_launches(torch.float32)
        other_launches(torch.float32)
    finally:
        torch.set_float32_matmul_precision(default_precision)
    failures, seen = 0, set()
    for kernel, args, kwargs in launches:
        source_args = source_of(kernel, args, dict(kwargs))
        if source_args is None:
            return API_CHANGED
        source, options, key = source_args
        if key in seen:
            continue
        seen.add(key)
        try:
            triton.compile(source, target=TARGET, options=options)
            print(f"ok    {kernel.__name__}")
        except CompilationError as error:  # the kernel's code: reported, then the exit status says it failed
            failures += 1
            print(f"FAIL  {kernel.__name__}: {type(error).__name__}: {str(error)[:2000]}")
        except (TypeError, AttributeError) as error:  # how this Triton's compile() is called
            print(f"triton {triton.__version__}: compiler API differs ({type(error).__name__}: {error})")
            return API_CHANGED
    print(f"{len(seen) - failures}/{len(seen)} launches compile for sm_90")
    return 1 if failures or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
