"""Compiles every Triton kernel launch of the package for a Hopper GPU (sm_90) on a machine without a GPU.

The other tests run the kernels under Triton's interpreter, which executes them as Python and skips the compiler's
checks: a kernel can pass them all and still fail to compile on a GPU (a loop-carried variable whose type changed
did), or need more shared memory than
the GPU has (only a launch finds out). Here the launch sites run on CPU tensors with each kernel replaced by a
stand-in that compiles the launch with its argument types, constexprs and warps for sm_90 (not with the alignment
specialisations the JIT adds on a GPU) and raises Triton's OutOfResources where an H100 would, so the fallbacks to
smaller tiles run as there. Prints a line per launch; exits 1 if any fails, 3 where this Triton's compiler entry
points differ from the ones used here. Run with TRITON_INTERPRET unset (`tests/test_kernel_compilation.py` does, a
`--shard` per test so that pytest's workers share the ~5 CPU minutes of compiling).
"""

import argparse
import os
import sys

import torch
import triton

API_CHANGED = 3  # exit status where this Triton's compiler entry points differ from the ones used here
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
except ImportError as error:
    print(f"triton {triton.__version__}: compiler API differs ({error})")
    sys.exit(API_CHANGED)

from blossomrec_hf.model import block_compressor as compressor
from blossomrec_hf.model import blossom_attention_triton as attention
from blossomrec_hf.model import fused_cross_entropy as loss
from blossomrec_hf.model import rotary_embedding as rotary

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 232448  # bytes a block may use on an H100 or H200 (227 KiB)
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
                 torch.int64: "*i64", torch.bool: "*i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class ApiChanged(Exception):
    """This Triton's compiler entry points differ from the ones used here."""


class Compiler:
    """Stands in for the kernels of some modules: `kernel[grid](...)` compiles the launch for sm_90 instead of running
    it, once per specialisation, and raises Triton's OutOfResources where it needs more shared memory than sm_90 has,
    as a launch on an H100 would (so the launch sites' fallbacks run as there)."""

    def __init__(self, modules):
        self.results = {}  # specialisation key -> (kernel name, shared memory bytes or None where it did not compile)
        for module in modules:
            for name, value in list(vars(module).items()):
                if isinstance(value, triton.runtime.jit.JITFunction):
                    setattr(module, name, self.stand_in(value))

    def stand_in(self, kernel):
        compiler = self

        class StandIn:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: compiler.launch(kernel, args, kwargs)
        return StandIn()

    def launch(self, kernel, args, kwargs) -> None:
        source, options, key = source_of(kernel, args, dict(kwargs))
        if key not in self.results:
            self.results[key] = (kernel.__name__, compile_once(kernel, source, options, key))
        shared = self.results[key][1]
        if shared is not None and shared > SHARED_MEMORY_LIMIT:
            raise OutOfResources(shared, SHARED_MEMORY_LIMIT, "shared memory")


def compile_once(kernel, source, options, key) -> int | None:
    """The launch's shared memory in bytes, None where it does not compile (printed either way)."""
    settings = {name: value for name, value in key[2]}
    try:
        shared = triton.compile(source, target=TARGET, options=options).metadata.shared
    except CompilationError as error:  # the kernel's code: reported, then the exit status says it failed
        print(f"FAIL  {kernel.__name__}: {type(error).__name__}: {str(error)[:2000]}")
        return None
    except (TypeError, AttributeError) as error:  # how this Triton's compile() is called
        raise ApiChanged(f"{type(error).__name__}: {error}") from error
    verdict = "ok  " if shared <= SHARED_MEMORY_LIMIT else "over"
    print(f"{verdict}  {kernel.__name__}: {shared} bytes of shared memory {settings}")
    return shared


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


def source_of(kernel, args, kwargs) -> tuple[ASTSource, dict, tuple]:
    """The launch as the compiler takes it (a signature of types and constexpr values), its launch options, and a
    key that tells one specialisation from another."""
    options = {key: kwargs.pop(key) for key in LAUNCH_OPTIONS if key in kwargs}
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constexprs = {}, {}
    for index, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = values[param.name]
        else:
            signature[param.name] = argument_type(values[param.name])
    named = tuple((param.name, values[param.name]) for param in kernel.params if param.is_constexpr)
    key = (kernel.__name__, tuple(signature.items()), named + tuple(sorted(options.items())))
    try:
        return ASTSource(fn=kernel, signature=signature, constexprs=constexprs), options, key
    except TypeError as error:
        raise ApiChanged(str(error)) from error


def attention_launches(dtype: torch.dtype, heads: int = 8, kv_heads: int = 2, dim: int = 16,
                       lengths=(200, 2000, 5000)) -> None:
    """Forward and backward of the attention, short (one-pass kernels) and long (gathered kernels; at 5,000 the
    compressed dk/dv writes float32 parts of several query segments), with and without compressed values."""
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


def one_pass_key_tiles(dtype: torch.dtype, blocks=(1, 2, 8)) -> None:
    """The one-pass dk/dv kernel with key tiles of several selection blocks (TUNING's one_pass_dkdv_blocks)."""
    default = attention.TUNING["one_pass_dkdv_blocks"]
    try:
        for count in blocks:
            attention.TUNING["one_pass_dkdv_blocks"] = count
            attention_launches(dtype, lengths=(200,))
            attention_launches(dtype, heads=8, kv_heads=2, dim=128, lengths=(200,))
    finally:
        attention.TUNING["one_pass_dkdv_blocks"] = default


def other_launches(dtype: torch.dtype) -> None:
    """The gated sum, rotary embedding and block compressor gather kernels, forward and backward."""
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
    k = torch.zeros(length, 2, dim, dtype=dtype)
    blocks = (length - 1) // 16
    flat = compressor._gathered(k, k, torch.zeros(blocks, 32, dtype=torch.long),
                                torch.zeros(blocks, 32, dtype=torch.bool), fused=True)
    compressor._folded(flat, torch.zeros(length, 2, dtype=torch.long), k, fused=True)


def loss_launches(dtype: torch.dtype, dims=(64, 128, 256)) -> None:
    """The item-softmax loss kernels, forward (with and without the hidden state's gradient) and backward, up to the
    widest hidden size they take."""
    for dim in dims:
        hidden, weight = torch.zeros(256, dim, dtype=dtype), torch.zeros(1000, dim, dtype=dtype)
        targets = torch.zeros(256, dtype=torch.long)
        for hidden_grad in (True, False):
            _, lse, _ = loss._forward(hidden, weight, targets, -100, dtype, hidden_grad)
        loss._backward_impl(hidden, weight, targets, lse, torch.ones(()), -100, dtype)


def launch_groups():
    """(name, launches) for bfloat16 as training runs them: the model's defaults, wide heads with 8 query heads per
    kv head (whose tiles are halved) and the one-pass kernels' widest block (4 heads of 128); and for float32 at
    torch's "high" matmul precision (train.py --tf32: the dots take three TF32 passes, custom_ops.dot_precision), the
    loss also at "highest" (exact). Every variant costs ~2 s a launch."""
    yield "bfloat16", lambda: attention_launches(torch.bfloat16)
    yield "bfloat16 wide heads", lambda: attention_launches(torch.bfloat16, heads=8, kv_heads=1, dim=128)
    yield "bfloat16 one pass at its limit", lambda: attention_launches(torch.bfloat16, heads=8, kv_heads=2, dim=128,
                                                                       lengths=(200,))
    yield "bfloat16 gate, rotary and compressor gather", lambda: other_launches(torch.bfloat16)
    yield "bfloat16 one-pass dk/dv over several key blocks", lambda: one_pass_key_tiles(torch.bfloat16)
    yield "bfloat16 loss", lambda: loss_launches(torch.bfloat16)
    for precision in ("high", "highest"):
        yield f"float32 loss at {precision!r}", lambda: loss_launches(torch.float32)
    yield "float32 at 'high'", lambda: attention_launches(torch.float32)
    # the widest float32 query group the kernels take (4 heads x 128), and the widest one-pass float32 block
    yield "float32 wide heads at 'high'", lambda: attention_launches(torch.float32, heads=8, kv_heads=2, dim=128)
    yield "float32 one pass at its limit at 'high'", lambda: attention_launches(torch.float32, heads=8, kv_heads=4,
                                                                                dim=128, lengths=(200,))
    yield "float32 gate, rotary and compressor gather at 'high'", lambda: other_launches(torch.float32)
    yield "float32 one-pass dk/dv over several key blocks at 'high'", lambda: one_pass_key_tiles(torch.float32)


SHARDS = ("bfloat16", "float32 loss", "float32 kernels")  # launch groups of about equal compile time


def shard_of(group: str) -> str:
    if group.startswith("bfloat16"):
        return "bfloat16"
    return "float32 loss" if group.startswith("float32 loss") else "float32 kernels"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", choices=SHARDS, help="compile only these launch groups (default: all)")
    shard = parser.parse_args(argv).shard
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run with TRITON_INTERPRET unset: the interpreter replaces the kernels this compiles")
    compiler = Compiler([attention, rotary, loss, compressor])
    default_precision, failed_groups = torch.get_float32_matmul_precision(), []
    try:
        for name, launches in launch_groups():
            if shard and shard_of(name) != shard:
                continue
            torch.set_float32_matmul_precision("highest" if name.endswith("'highest'") else "high")
            try:
                launches()
            except OutOfResources as error:  # a launch site with no smaller tiles to fall back on
                failed_groups.append(name)
                print(f"FAIL  {name}: {error}")
    except ApiChanged as error:
        print(f"triton {triton.__version__}: compiler API differs ({error})")
        return API_CHANGED
    finally:
        torch.set_float32_matmul_precision(default_precision)
    did_not_compile = sum(shared is None for _, shared in compiler.results.values())
    print(f"{len(compiler.results) - did_not_compile}/{len(compiler.results)} launches compile for sm_90; "
          f"{len(failed_groups)} launch groups need more shared memory than it has")
    return 1 if did_not_compile or failed_groups or not compiler.results else 0


if __name__ == "__main__":
    sys.exit(main())
