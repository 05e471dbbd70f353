"""The fused BlossomRec attention as PyTorch custom operators: torch.library.opcheck of the forward and the backward
operator, and torch.compile(fullgraph=True) of the varlen attention, forward and backward, bitwise equal to eager.
Triton runs through its interpreter here; the kernels' numerics are tested in test_attention_varlen.py.
"""

import pytest
import torch

from blossomrec_hf.model import blossom_attention_triton
from blossomrec_hf.model.blossom_attention_triton import blossom_attention_triton_varlen
from test_attention_varlen import GEOMETRY, packed_inputs, run, split, weights_for
from triton_support import requires_triton

pytestmark = requires_triton

# With the kernels' smallest blocks (16): the history of 37 has two compressed blocks and three selection blocks, so
# every branch has keys to attend; the one of 5 lies within its first block (no compressed block, no selection).
LENGTHS = [5, 37]


def forward_arguments(compressed: bool, lengths=LENGTHS):
    """The forward operator's arguments: dense q, k, v, ck, cv (None without the compressed branch) needing
    gradients, the history bounds, max_length and the geometry's fields."""
    leaves, sizes = packed_inputs(lengths, compressed, torch.float32, seed=0)
    q, k, v = (x.detach().contiguous().requires_grad_() for x in split(leaves[0]))
    ck, cv = (leaves[1:] + [None])[:2]
    return (q, k, v, ck, cv, sizes["cu_seqlens"], sizes["cu_compressed"], sizes["max_length"],
            *blossom_attention_triton._geometry_fields(GEOMETRY))


@pytest.mark.parametrize("compressed", [True, False])
def test_opcheck_forward_and_backward(compressed):
    arguments = forward_arguments(compressed)
    torch.library.opcheck(blossom_attention_triton._FORWARD, arguments)
    with torch.no_grad():
        outputs = blossom_attention_triton._FORWARD(*arguments)
    generator = torch.Generator().manual_seed(1)
    # strided output gradients (as a transposed consumer gives them): the operator copies them to token rows
    output_grads = [torch.randn(o.shape[1], o.shape[0], o.shape[2], generator=generator).transpose(0, 1)
                    for o in outputs[:3]]
    tensors = [None if x is None else x.detach() for x in arguments[:7]]
    torch.library.opcheck(blossom_attention_triton._BACKWARD, (*tensors, *outputs, *output_grads, *arguments[7:]))


@pytest.mark.parametrize("compressed", [True, False])
def test_compiled_attention_matches_eager(compressed):
    """One graph (fullgraph: a graph break fails), compiled once by inductor with dynamic shapes for two packings
    (a recompile fails); outputs and gradients bitwise equal to eager, since both run the same kernels. The first
    packing's sizes (tokens 71, compressed blocks 3, bounds 5, longest 37) equal no other size: one that did would be
    guarded equal (duck sizing)."""
    torch._dynamo.reset()  # dynamo caches per function: the other parameter's graph would count as a recompile
    compiled = torch.compile(blossom_attention_triton_varlen, fullgraph=True, dynamic=True, backend="inductor")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([5, 37, 20, 9], [40, 3, 20]):
            leaves, sizes = packed_inputs(lengths, compressed, torch.float32, seed=len(lengths))
            weights = [w.float() for w in weights_for(lengths, seed=1)]
            got, want = (run(attention, leaves, sizes, weights)
                         for attention in (compiled, blossom_attention_triton_varlen))
            assert len(got[0]) == (3 if compressed else 2)
            for a, b in zip(got[0] + got[1], want[0] + want[1]):
                assert (a is None and b is None) or torch.equal(a, b)
