"""Kernel tiles that fit the GPU's shared memory.

Triton compiles a kernel at its first launch and only then learns how much shared memory it needs; where that is more
than the GPU has, it raises OutOfResources before the kernel runs, so nothing is half written. The tuned tiles fit
bf16 on an H100, but float32 operands at three TF32 passes need up to three times as much, and smaller GPUs have
half an H100's. `fit_tiles` retries such a launch with smaller tiles and remembers the tiles that fitted. (Launches
with no tile to shrink are sized for an H100 where they are chosen: blossom_attention_triton.ONE_PASS_ELEMENTS.)
"""

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # without triton no kernel is launched
    class OutOfResources(Exception):
        """Stands in for Triton's error where Triton is not installed."""

_FITTED: dict[tuple, dict[str, int]] = {}


def fit_tiles(key: tuple, tiles: dict[str, int], smallest: dict[str, int], launch):
    """`launch(tiles)`, or where the GPU lacks the shared memory for them, `launch` again with the largest tile that
    is still above its `smallest` halved, until one fits (the last refusal is raised). `key` names the launch (kernel,
    dtype, widths, precision, device); the tiles that fitted are used at once by later calls with the same key."""
    memo = (*key, tuple(sorted(tiles.items())))
    current = dict(_FITTED.get(memo, tiles))
    while True:
        try:
            result = launch(current)
        except OutOfResources:
            shrinkable = [name for name, size in current.items() if size // 2 >= smallest[name]]
            if not shrinkable:
                raise
            largest = max(shrinkable, key=lambda name: current[name])
            current[largest] //= 2
            continue
        _FITTED[memo] = current
        return result
