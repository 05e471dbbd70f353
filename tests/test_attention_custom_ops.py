"""The fused BlossomRec attention and gated sum as PyTorch custom operators: torch.library.opcheck of each forward
and backward operator, and torch.compile(fullgraph=True) of the varlen attention (alone, then followed by the gated
sum, as the model calls them), forward and backward, bitwise equal to eager. Triton runs through its interpreter
here; the kernels' numerics are tested in test_attention_varlen.py and test_attention_triton.py.
"""

import pytest
import torch

from blossomrec_hf.model import blossom_attention_triton
from blossomrec_hf.model.blossom_attention_triton import blossom_attention_triton_varlen, gated_sum
from test_attention_varlen import GEOMETRY, HEADS, packed_inputs, run, split, weights_for
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
    torch.library.opcheck(blossom_attention_triton._FORWARD.op, arguments)
    with torch.no_grad():
        outputs = blossom_attention_triton._FORWARD(*arguments)
    generator = torch.Generator().manual_seed(1)
    # strided output gradients (as a transposed consumer gives them): the operator copies them to token rows
    output_grads = [torch.randn(o.shape[1], o.shape[0], o.shape[2], generator=generator).transpose(0, 1)
                    for o in outputs[:3]]
    tensors = [None if x is None else x.detach() for x in arguments[:7]]
    torch.library.opcheck(blossom_attention_triton._BACKWARD.op, (*tensors, *outputs, *output_grads, *arguments[7:]))


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


def gate_inputs(num_branches: int, dtype: torch.dtype, tokens: int = 11, dim: int = 16, seed: int = 0,
                token_major: bool = False):
    """Gate logits, columns of a wider projection (a strided view), and branches, all needing gradients: token-major
    as the model passes them (logits [T, H, n], branches [T, H, D]), or batched (logits [1, T, H, n], branches
    [1, H, T, D], transposed views of token rows)."""
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(tokens, 5 + HEADS * num_branches, generator=generator).to(dtype).requires_grad_()
    logits = projection[:, 5:].view(tokens, HEADS, num_branches)
    branches = [torch.randn(tokens, HEADS, dim, generator=generator).to(dtype) for _ in range(num_branches)]
    if not token_major:
        logits, branches = logits[None], [b.unsqueeze(0).transpose(1, 2) for b in branches]
    return logits, [b.requires_grad_() for b in branches]


@pytest.mark.parametrize("num_branches", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("token_major", [False, True])
def test_opcheck_gated_sum_forward_and_backward(num_branches, dtype, token_major):
    logits, branches = gate_inputs(num_branches, dtype, token_major=token_major)
    arguments = (logits, *branches, *[None] * (3 - num_branches))
    torch.library.opcheck(blossom_attention_triton._GATED_FORWARD.op, arguments)
    with torch.no_grad():
        out = blossom_attention_triton._GATED_FORWARD(*arguments)
    # a contiguous output gradient (batched: [1, H, T, D], where the output is a view of [1, T, H, D] memory)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    tensors = [None if x is None else x.detach() for x in arguments]
    torch.library.opcheck(blossom_attention_triton._GATED_BACKWARD.op, (*tensors, dout))


@pytest.mark.parametrize("compressed", [True, False])
def test_compiled_attention_then_gated_sum_matches_eager(compressed):
    """The model's order: branches of the varlen attention, then their gated sum with logits from a projection's
    columns; one graph (fullgraph), compiled once with dynamic shapes for two packings; outputs and gradients of every
    leaf bitwise equal to eager."""

    def attention_then_gates(projection, ck, cv, gate_projection, cu_seqlens, cu_compressed, max_length):
        branches = blossom_attention_triton_varlen(*split(projection), ck, cv, cu_seqlens=cu_seqlens,
                                                   cu_compressed=cu_compressed, max_length=max_length,
                                                   geometry=GEOMETRY)
        outputs = [b for b in branches if b is not None]
        logits = gate_projection[:, 5:].view(projection.shape[0], HEADS, len(outputs))
        return gated_sum(logits, outputs, fused=True)

    torch._dynamo.reset()
    compiled = torch.compile(attention_then_gates, fullgraph=True, dynamic=True, backend="inductor")
    num_branches = 3 if compressed else 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([5, 37, 20, 9], [40, 3, 20]):
            leaves, sizes = packed_inputs(lengths, compressed, torch.float32, seed=len(lengths))
            generator = torch.Generator().manual_seed(len(lengths))
            gate_projection = torch.randn(sum(lengths), 5 + HEADS * num_branches, generator=generator,
                                          requires_grad=True)
            weights = weights_for(lengths, seed=1)[0].float()  # [T, H, D]
            results = []
            for function in (compiled, attention_then_gates):
                out = function(*(leaves + [None])[:3], gate_projection, *sizes.values())
                # no dck without cv: the selection is not differentiable
                results.append([out, *torch.autograd.grad((weights * out).sum(), leaves + [gate_projection],
                                                          allow_unused=True)])
            for got, want in zip(*results):
                assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("num_branches", [2, 3])
@pytest.mark.parametrize("token_major", [False, True])
def test_compiled_plain_gated_sum_needs_no_graph_break(num_branches, token_major):
    """The PyTorch path (fused=False) compiles as one graph too, with dynamic shapes; inductor fuses its arithmetic,
    so results match eager to rounding."""
    torch._dynamo.reset()
    compiled = torch.compile(gated_sum, fullgraph=True, dynamic=True, backend="inductor")
    for tokens in (11, 6):
        logits, branches = gate_inputs(num_branches, torch.float32, tokens=tokens, seed=tokens,
                                       token_major=token_major)
        got, want = (function(logits, branches + [None], fused=False) for function in (compiled, gated_sum))
        torch.testing.assert_close(got, want)
        dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
        for a, b in zip(torch.autograd.grad(got, [logits, *branches], dout),
                        torch.autograd.grad(want, [logits, *branches], dout)):
            torch.testing.assert_close(a, b)
