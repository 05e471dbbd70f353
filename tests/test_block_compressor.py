"""The learned block compressor as two custom operators with a written-out backward: its gradients against autograd
through a plain PyTorch reference (float64, with and without kept activations, a static batch's spare rows),
torch.library.opcheck, and torch.compile(fullgraph=True) of forward and backward; the Triton gather and its adjoint
(`fused`, interpreter) against the PyTorch ones."""

import copy

import pytest
import torch

from blossomrec_hf import BlossomRecConfig
from blossomrec_hf.model import block_compressor
from blossomrec_hf.model.block_compressor import BlockCompressor
from blossomrec_hf.model.history_layout import HistoryLayout
from triton_support import requires_triton

LENGTHS = (3, 17, 9, 1)  # packed histories: blocks of 8 with stride 4 start before a history's first item


def compressor_and_inputs(static: bool, seed: int = 0, lengths=LENGTHS, block_size: int = 8, dim: int = 8):
    """A learned compressor with random parameters (float64), packed k and v needing gradients, and their blocks;
    `static` adds spare rows past the last block (`valid`), as a compiled batch has them. Two kv heads of `dim`."""
    config = BlossomRecConfig(n_items=5, hidden_size=2 * dim, num_attention_heads=2, num_key_value_heads=2,
                              compress_block_size=block_size, compress_stride=4, selection_block_size=4)
    torch.manual_seed(seed)
    compressor = BlockCompressor(config).double()
    for parameter in compressor.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    tokens = sum(lengths)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.ones(1, tokens, dtype=torch.long)
    layout = (HistoryLayout.from_inputs(ids, None, 1, positions, cu_seqlens, max(lengths)) if static
              else HistoryLayout.from_inputs(ids, None, 1, positions))
    blocks = layout.compressed_blocks(block_size=block_size, stride=4)
    assert (blocks.valid is not None) == static and (not static or not blocks.valid.all())  # spare rows
    k, v = (torch.randn(tokens, 2, dim, dtype=torch.float64, requires_grad=True) for _ in range(2))
    return compressor, k, v, blocks


def reference(compressor: BlockCompressor, k, v, blocks):
    """The published compressor by autograd: each block's rows (zeros before its history) plus the position
    embeddings, flattened, through relu(x W1 + b1) W2 + b2; rows that are no block zeroed."""
    outputs = []
    for index, x in enumerate((k, v)):
        block = x[blocks.slot_tokens] * blocks.covered[:, :, None, None]  # [W, block, Hkv, D]
        block = (block + compressor.positions[index][None, :, None]).transpose(1, 2).flatten(2)
        hidden = torch.relu(block @ compressor.hidden_weight[index] + compressor.hidden_bias[index])
        out = hidden @ compressor.output_weight[index] + compressor.output_bias[index]
        outputs.append(out if blocks.valid is None else out * blocks.valid[:, None, None])
    return outputs


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_forward_and_gradients_equal_autograd_through_the_reference(static, recompute):
    compressor, k, v, blocks = compressor_and_inputs(static)
    grads = [torch.randn(blocks.slot_tokens.shape[0], 2, 8, dtype=torch.float64) for _ in range(2)]
    inputs = [k, v, *compressor.parameters()]
    expected = reference(compressor, k, v, blocks)
    expected_grads = torch.autograd.grad(expected, inputs, grads)
    got = compressor(k, v, blocks, recompute=recompute)
    got_grads = torch.autograd.grad(got, inputs, grads)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    for name, e, g in zip(["k", "v", *dict(compressor.named_parameters())], expected_grads, got_grads):
        torch.testing.assert_close(g, e, msg=name)


def test_gradcheck():
    compressor, k, v, blocks = compressor_and_inputs(static=True)
    parameters = [p.detach().requires_grad_() for p in compressor.parameters()]

    def run(k, v, *weights):
        return block_compressor._FORWARD(k, v, blocks.slot_tokens, blocks.covered, blocks.token_slot_rows,
                                         blocks.valid, *weights, False, False)[0]

    # fast mode: a random direction instead of every input element (42 s -> 2 s on two cores); the backward's
    # products with random output gradients are compared against autograd through the reference above
    assert torch.autograd.gradcheck(run, (k, v, *parameters), fast_mode=True)


@pytest.mark.parametrize("keep_activations", [False, True])
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=requires_triton)])
def test_opcheck(keep_activations, fused):
    compressor, k, v, blocks = compressor_and_inputs(static=True)
    dtype = torch.float32 if fused else torch.float64  # the Triton gather takes 32- and 16-bit operands
    k, v = (x.detach().to(dtype).requires_grad_() for x in (k, v))
    weights = [p.detach().to(dtype).requires_grad_() for p in compressor.parameters()]
    arguments = (k, v, blocks.slot_tokens, blocks.covered, blocks.token_slot_rows, blocks.valid, *weights,
                 keep_activations, fused)
    torch.library.opcheck(block_compressor._FORWARD.op, arguments)
    with torch.no_grad():
        _, flat, hidden = block_compressor._FORWARD(*arguments)
    grad = torch.randn(2, blocks.slot_tokens.shape[0], 2, 8, dtype=dtype)
    detached = [a.detach() for a in arguments[:10]]  # the backward operator has no autograd formula of its own
    torch.library.opcheck(block_compressor._BACKWARD.op, (*detached, flat, hidden, grad, fused))


@requires_triton
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths, block_size, dim", [
    (LENGTHS, 8, 8),
    ((2, 4, 1), 8, 8),  # no history is longer than a block: no block at all
    (LENGTHS, 12, 6),  # slots and channels (2 heads x 6) that are no power of two: masked tiles
])
def test_fused_gather_equals_pytorch(static, recompute, dtype, lengths, block_size, dim):
    """The Triton gather and its adjoint move the same numbers as the PyTorch ones: outputs and all gradients equal in
    float32; in bf16 within rounding (the adjoint sums a token's slots in float32 and rounds once, where PyTorch's CPU
    sum differed by an ulp in 16 % of the elements)."""
    compressor, k, v, blocks = compressor_and_inputs(static, seed=1, lengths=lengths, block_size=block_size, dim=dim)
    compressor = compressor.to(dtype)
    k, v = (x.detach().to(dtype).requires_grad_() for x in (k, v))
    grads = [torch.randn(blocks.slot_tokens.shape[0], 2, dim, dtype=dtype) for _ in range(2)]
    inputs = [k, v, *compressor.parameters()]
    results = []
    for fused in (False, True):
        outputs = compressor(k, v, blocks, recompute=recompute, fused=fused)
        results.append([*outputs, *torch.autograd.grad(outputs, inputs, grads)])
    for name, expected, got in zip(["keys", "values", "k", "v", *dict(compressor.named_parameters())], *results):
        exact = dict(rtol=0, atol=0) if dtype == torch.float32 else {}
        torch.testing.assert_close(got, expected, **exact, msg=lambda m: f"{name}: {m}")


def test_compiled_forward_and_backward_equal_eager():
    compressor, k, v, blocks = compressor_and_inputs(static=True)

    def step(k, v):
        keys, values = compressor(k, v, blocks)
        return (keys.square().sum() + values.sin().sum())

    eager = torch.autograd.grad(step(k, v), [k, v, *compressor.parameters()])
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(k, v),
                                   [k, v, *compressor.parameters()])
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("recompute", [False, True])
def test_second_derivatives_equal_autograd_through_the_reference(recompute):
    """A double backward (a gradient penalty) differentiates the written-out backward: in plain PyTorch, from the
    inputs, whether or not the forward kept its activations (those carry no graph)."""
    compressor, k, v, blocks = compressor_and_inputs(static=True)
    inputs = [k, v, *compressor.parameters()]

    def second_derivatives(outputs):
        grads = torch.autograd.grad(sum(o.sin().sum() for o in outputs), inputs, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)

    expected = second_derivatives(reference(compressor, k, v, blocks))
    for name, e, g in zip(["k", "v", *dict(compressor.named_parameters())], expected,
                          second_derivatives(compressor(k, v, blocks, recompute=recompute))):
        torch.testing.assert_close(g, e, msg=name)


def test_float32_parameters_with_16_bit_operands():
    """Under autocast the parameters stay float32 and k, v come in bf16: the operator computes in bf16 and returns
    the parameters' gradients in float32, the same numbers as a bf16 copy of the compressor gives."""
    compressor, k, v, blocks = compressor_and_inputs(static=True, seed=2)
    compressor = compressor.float()
    k, v = (x.detach().to(torch.bfloat16).requires_grad_() for x in (k, v))
    half = copy.deepcopy(compressor).to(torch.bfloat16)
    grads = [torch.randn(blocks.slot_tokens.shape[0], 2, 8, dtype=torch.bfloat16) for _ in range(2)]
    results = []
    for module in (compressor, half):
        outputs = module(k, v, blocks)
        results.append([*outputs, *torch.autograd.grad(outputs, [k, v, *module.parameters()], grads)])
    for name, got, expected in zip(["keys", "values", "k", "v", *dict(compressor.named_parameters())], *results):
        assert got.dtype == (torch.float32 if name in dict(compressor.named_parameters()) else torch.bfloat16), name
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
