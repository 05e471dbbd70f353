"""PTX instructions of the attention kernels as compiled for a Hopper GPU (sm_90), per loop body, on a machine
without a GPU: a first look at a kernel change before GPU time is spent on it.

The launches of one forward + backward (bf16, 8 heads, 2 kv heads, head dim 16: the benchmark's shapes) are
compiled the way `tests/compile_kernels_for_hopper.py` does, plus the 16-byte alignment the GPU's JIT assumes of
pointer arguments (without it loads are not vectorised and the compiler picks other layouts, so counts would
mislead). For each kernel: its instruction count, its global loads, its registers and spills (ptxas -v), and each
loop of more than `--min-block` instructions (from its header label to the branch back to it; an outer loop's count
includes its inner loops) with its most frequent instructions. Static counts, not timings: a loop's count is what
one iteration issues per thread, so between two versions of a kernel it shows what moved (shuffles for reductions
across lanes, bar.sync for those across warps, conversions, exponentials), not how long a step takes. (Until the
twelfth session this counted basic blocks, which also took in the code after a loop: its per-chunk counts of the
gathered loops were too high.)

    PYTHONPATH=src python benchmarks/kernel_instructions.py [--length 2000] [--kernels backward_dq ...]
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what Triton 3.9 defaults to (and warns about)
import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import compile_kernels_for_hopper as hopper  # noqa: E402

from blossomrec_hf.model import blossom_attention_triton as attention  # noqa: E402

INSTRUCTION = re.compile(r"^\s+(?:@!?%p\d+\s+)?([a-z0-9]+(?:\.[a-z0-9_]+)*)", re.M)
LABEL = re.compile(r"^(\$L__BB\d+_\d+):", re.M)
BACK_EDGE = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")


def compiled_ptx(length: int) -> dict[str, str]:
    """PTX of each attention kernel (its first specialisation) for one forward + backward at `length`."""
    ptx = {}
    aligned_source = hopper.source_of

    def source_of(kernel, args, kwargs):
        source, options, key = aligned_source(kernel, args, kwargs)
        source.attrs = {(index,): [["tt.divisibility", 16]] for index, param in enumerate(kernel.params)
                        if source.signature[param.name].startswith("*")}
        return source, options, key

    def compile_once(kernel, source, options, key):
        compiled = triton.compile(source, target=hopper.TARGET, options=options)
        ptx.setdefault(kernel.__name__, compiled.asm["ptx"])
        return compiled.metadata.shared

    hopper.source_of, hopper.compile_once = source_of, compile_once
    hopper.Compiler([attention])
    hopper.attention_launches(torch.bfloat16, lengths=(length,))
    return ptx


def counts(text: str) -> collections.Counter:
    return collections.Counter(INSTRUCTION.findall(text))


def registers(ptx: str) -> str:
    """Registers per thread and bytes spilled, as the ptxas that Triton runs for sm_90 reports them for this PTX."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        with tempfile.TemporaryDirectory() as folder:
            source = Path(folder) / "kernel.ptx"
            source.write_text(ptx)
            report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(source), "-o",
                                     str(Path(folder) / "kernel.cubin")], capture_output=True, text=True).stderr
    except (ImportError, OSError) as error:
        return f"registers unknown ({error})"
    used = re.search(r"Used (\d+) registers", report)
    spilled = re.search(r"(\d+) bytes spill stores", report)
    if not used:
        return "registers unknown (ptxas printed no count)"
    return f"{used.group(1)} registers, {spilled.group(1) if spilled else 0} bytes spilled"


def report(name: str, ptx: str, min_block: int, top: int) -> str:
    whole = counts(ptx)
    loads = sum(n for op, n in whole.items() if op.startswith("ld.global"))
    lines = [f"{name}: {sum(whole.values())} instructions, {loads} global loads, {registers(ptx)}"]
    headers = {match.group(1): match.start() for match in LABEL.finditer(ptx)}
    for branch in BACK_EDGE.finditer(ptx):
        header = headers.get(branch.group(1))
        if header is not None and header < branch.start():
            body = counts(ptx[header:branch.end()])
            if sum(body.values()) >= min_block:
                busiest = ", ".join(f"{op} {n}" for op, n in body.most_common(top))
                lines.append(f"  loop {branch.group(1):>12} {sum(body.values()):5}: {busiest}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=2000, help="history length (2,000: the gathered kernels)")
    parser.add_argument("--kernels", nargs="*", default=None, help="kernel names (default: every one launched)")
    parser.add_argument("--min-block", type=int, default=300)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)
    ptx = compiled_ptx(args.length)
    for name in args.kernels or sorted(ptx):
        print(report(name, ptx[name], args.min_block, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
