"""CUDA time per Triton kernel of one BlossomRec attention forward + backward, for alternative launch settings.

Published shapes (8 heads, 2 kv heads, head dim 16, bf16, 131,072 tokens); each variant overrides entries of
`blossom_attention_triton.TUNING` and is profiled with torch.profiler (ms per step, 5 steps).

    python benchmarks/tune_kernels.py [--lengths 1024 16384] [--variants base dkdv2]

Short lengths (L <= 256 by default) take the one-pass kernels: their three kernels are the sfwd, dq and sdkdv
columns there.
"""

import argparse

import torch

from blossomrec_hf.model import blossom_attention_triton as backend
from blossomrec_hf.model.sparse_patterns import SparseGeometry
from profile_attention import cuda_profile

GEOMETRY = SparseGeometry(32, 16, 16, 4, 8)
KERNELS = ["compressed_forward", "sparse_forward", "backward_dq", "sparse_backward_dkdv", "compressed_backward_dkdv"]
ONE_PASS = {"one_pass_forward": "sparse_forward", "one_pass_backward_dq": "backward_dq",
            "one_pass_backward_dkdv": "sparse_backward_dkdv"}  # counted in the gathered kernels' columns
VARIANTS = {
    "base": {},
    "warps8": {k: 8 for k in backend.TUNING if k.endswith("_warps")},
    "warps2": {k: 2 for k in backend.TUNING if k.endswith("_warps")},
    "chunk16k": {"sparse_chunk_elements": 16384},
    "chunk4k": {"sparse_chunk_elements": 4096},
    "chunk2k": {"sparse_chunk_elements": 2048, "dq_chunk_elements": 2048},
    "dqchunk8k": {"dq_chunk_elements": 8192},
    "rows128": {"forward_rows": 128, "dkdv_rows": 256},
    "keys2x": {"forward_keys": 128, "forward_keys_long": 256, "dq_keys": 64, "dkdv_keys": 128},
    "keys.5x": {"forward_keys": 32, "forward_keys_long": 64, "dq_keys": 16, "dkdv_keys": 32},
    "dkdv2": {"one_pass_dkdv_blocks": 2},
    "dkdv1": {"one_pass_dkdv_blocks": 1},
    "dkdv8": {"one_pass_dkdv_blocks": 8},
    "dkdv4w2": {"one_pass_dkdv_warps": 2},
    "dkdv8w8": {"one_pass_dkdv_blocks": 8, "one_pass_dkdv_warps": 8},
    "dqw2": {"one_pass_dq_warps": 2},
    "opkeys16": {"one_pass_keys": 16},
    "opkeys64": {"one_pass_keys": 64},
    "opwarps2": {"one_pass_forward_warps": 2, "one_pass_dq_warps": 2, "one_pass_dkdv_warps": 2},
    "opwarps8": {"one_pass_forward_warps": 8, "one_pass_dq_warps": 8, "one_pass_dkdv_warps": 8},
    "onepass32": {"one_pass_max_blocks": 32},
    "onepass64": {"one_pass_max_blocks": 64},
    "seg1024": {"compressed_dkdv_segment": 1024},
    "seg4096": {"compressed_dkdv_segment": 4096},
    "seg16k": {"compressed_dkdv_segment": 16384},  # one segment up to L = 16,384: the unsplit dck / dcv
}


def inputs(length: int):
    batch = 131072 // length
    torch.manual_seed(0)

    def make(heads, positions):
        return (torch.randn(batch, positions, heads, 16, device="cuda") * 0.5).to(torch.bfloat16).transpose(1, 2)

    tensors = [make(8, length), make(2, length), make(2, length), make(2, length // 16), make(2, length // 16)]
    return [t.requires_grad_() for t in tensors]


def profile(length: int) -> dict[str, float]:
    q, k, v, ck, cv = inputs(length)
    weights = [torch.randn(q.shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    def step():
        outputs = backend.blossom_attention_triton(q, k, v, ck, cv, GEOMETRY)
        torch.autograd.backward(outputs, weights)

    times = {name: 0.0 for name in KERNELS + ["other"]}
    for event in cuda_profile(step):
        key = ONE_PASS.get(event.key, event.key)
        key = key if key in KERNELS else "other"
        times[key] += event.device_time_total / 5 / 1e3
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    defaults = dict(backend.TUNING)
    short = ["cfwd", "sfwd", "dq", "sdkdv", "cdkdv", "other"]
    for length in args.lengths:
        print(f"\nL={length}: ms per forward+backward step\n{'variant':>9} " + " ".join(f"{s:>7}" for s in short)
              + f" {'total':>7}")
        for name in args.variants:
            backend.TUNING.clear()
            backend.TUNING.update(defaults, **VARIANTS[name])
            times = profile(length)
            print(f"{name:>9} " + " ".join(f"{times[k]:7.3f}" for k in KERNELS + ["other"])
                  + f" {sum(times.values()):7.3f}", flush=True)
    backend.TUNING.clear()
    backend.TUNING.update(defaults)


if __name__ == "__main__":
    main()
