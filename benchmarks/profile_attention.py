"""Where the time of one BlossomRec attention module step goes: CUDA time per kernel (torch.profiler), and with
`--host` the Python functions that take the host's time (cProfile), for steps that the launches, not the GPU, bound.

    python benchmarks/profile_attention.py [--lengths 1024 16384] [--implementation blossom_triton] [--host]
"""

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from benchmark_attention import module_step  # noqa: E402


def cuda_profile(step, warmup: int = 3, repeat: int = 5):
    """torch.profiler key averages of `repeat` calls of `step` after `warmup` untimed ones (CUDA activity only)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(repeat):
            step()
        torch.cuda.synchronize()
    return profiler.key_averages()


def host_profile(step, repeat: int = 20, rows: int = 25) -> str:
    """Host milliseconds to issue one step (GPU work not awaited), and cProfile's busiest functions over `repeat`."""
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        step()
    issue_ms = (time.perf_counter() - start) / repeat * 1e3
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeat):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    return f"{issue_ms:8.3f}        host ms to issue one step\n" + text.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 4096])
    parser.add_argument("--implementation", default="blossom_triton")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--host", action="store_true", help="also profile the host side (Python) of a step")
    parser.add_argument("--compiled", action="store_true",
                        help="profile the torch.compile'd module as well (kernel lists side by side in the output)")
    args = parser.parse_args()
    for length, compiled in [(length, c) for length in args.lengths for c in (False, True) if c <= args.compiled]:
        make_step = module_step(args.implementation, length)
        step = make_step(torch.compile) if compiled else make_step()
        averages = cuda_profile(step)
        print(f"\n== {args.implementation} L={length}{' compiled' if compiled else ''}: CUDA ms per step, by kernel")
        events = sorted(averages, key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in events) / 5 / 1e3
        for event in events[:args.rows]:
            print(f"{event.device_time_total / 5 / 1e3:8.3f} {event.count // 5:4d}x  {event.key[:110]}")
        print(f"{total:8.3f}        total CUDA time")
        wall = triton.testing.do_bench(step, warmup=20, rep=200, return_mode="median")
        print(f"{wall:8.3f}        wall time per step (do_bench); above the CUDA total = the GPU waits for launches")
        if args.host:
            print(host_profile(step))
        del step


if __name__ == "__main__":
    main()
