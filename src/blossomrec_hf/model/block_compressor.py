"""LTIS's block compressor: one key and one value per compressed block of a history, as BlossomRec publishes it.

The learned compressor is an MLP over each block's keys plus intra-block position embeddings, and another over its
values. Its forward and backward are one PyTorch custom operator each (custom_ops.py), with the backward written
out: autograd would record ~30 operations forward and ~45 backward (the block gather, the three batched matmuls, the
masks), and an eager training step pays each of them on the host; as two operators it pays two, and torch.compile
still traces them (fake implementations). The matmuls are PyTorch's; the block gather and its adjoint are Triton
kernels where those run (`fused`, triton_compressor_kernels.py) and plain PyTorch elsewhere.
"""

import math

import torch
from torch import nn

from .custom_ops import compute_dtype, define_op, kernels_run_on
from .history_layout import CompressedBlocks, gather_slots, sum_slots

try:
    import triton
except ImportError:
    triton = None

if triton is not None:
    from .triton_compressor_kernels import fold_blocks, unfold_blocks

Tensor = torch.Tensor
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 (tests, gradcheck) stays exact in PyTorch
ROWS = 4  # blocks per program of the gather; tokens per program of its adjoint: 16 * ROWS


class BlockCompressor(nn.Module):
    """Turns each compressed block of keys (and values) into one key (value) for LTIS scoring.

    Learned (`use_compressed_branch`): as published, an MLP over the block's keys plus intra-block position
    embeddings, and another over the values; the compressed branch's output is what trains them. The two MLPs are
    stored stacked (index 0 keys, 1 values) so that both run as one chain of batched matmuls. Otherwise: the mean of
    the block's keys, with no parameters, so that no parameter is left without a gradient.
    """

    def __init__(self, config):
        super().__init__()
        self.learned = config.use_compressed_branch
        if self.learned:
            block, dim = config.compress_block_size, config.head_dim
            width = block * dim
            self.positions = nn.Parameter(torch.zeros(2, block, dim))
            self.hidden_weight = nn.Parameter(torch.zeros(2, width, width))  # [in, out]
            self.hidden_bias = nn.Parameter(torch.zeros(2, width))
            self.output_weight = nn.Parameter(torch.zeros(2, width, dim))  # [in, out]
            self.output_bias = nn.Parameter(torch.zeros(2, dim))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, so that a bare module is usable (the model re-initialises it with
        `initializer_range`). All-zero weights would make every compressed key equal and every selection a tie."""
        if not self.learned:
            return
        for weight, bias in ((self.hidden_weight, self.hidden_bias), (self.output_weight, self.output_bias)):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, k: Tensor, v: Tensor, blocks: CompressedBlocks, recompute: bool = False, fused: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        """k, v [T, Hkv, D] (tokens, history by history) -> compressed keys and values [W, Hkv, D], one per block of
        `blocks` (values None when not learned); rows that are no block (`blocks.valid`) are zero and pass no
        gradient. With `recompute`, the MLPs' activations (their gathered inputs and hidden layer, 512 bytes a token
        at the default size) are not kept for the backward but recomputed there from k and v, which the attention
        keeps anyway. `fused`: the Triton gather where the kernels run (CUDA, or TRITON_INTERPRET=1)."""
        if not self.learned:
            real_positions = blocks.covered.sum(dim=1).clamp(min=1).to(k.dtype)
            return blocks.only_valid(blocks.gather(k).sum(dim=1) / real_positions[:, None, None]), None
        dtype = compute_dtype(k, v)
        # the parameters go in as they are (float32 under autocast): the operator casts them and returns their
        # gradients in their own dtype, so that autograd records no cast node for them (five nodes, ten casts a step)
        weights = (self.positions, self.hidden_weight, self.hidden_bias, self.output_weight, self.output_bias)
        valid = blocks.valid if blocks.valid is not None else blocks.covered.new_empty(0)
        fused = fused and triton is not None and kernels_run_on(k) and dtype in FUSED_DTYPES
        compressed = _FORWARD(k.to(dtype).contiguous(), v.to(dtype).contiguous(), blocks.slot_tokens, blocks.covered,
                              blocks.token_slot_rows, valid, *weights, not recompute, fused)[0]
        keys, values = compressed.unbind(0)
        return keys, values


def _gathered(k: Tensor, v: Tensor, slot_tokens: Tensor, covered: Tensor, fused: bool) -> Tensor:
    """Every block's keys and values as the MLPs' rows: [2, W * Hkv, block * D], zeros before a history's start."""
    num_blocks, block_size = slot_tokens.shape
    kv_heads, dim = k.shape[1:]
    if fused:
        flat = k.new_empty(2, num_blocks * kv_heads, block_size * dim)
        if num_blocks:  # no block (every history a block or shorter): nothing to launch
            unfold_blocks[(triton.cdiv(num_blocks, ROWS),)](
                K=k, V=v, SLOT_TOKENS=slot_tokens, COVERED=covered, OUT=flat, n_blocks=num_blocks, HKV=kv_heads,
                D=dim, SLOTS=block_size, BLOCK_SLOTS=triton.next_power_of_2(block_size),
                BLOCK_C=triton.next_power_of_2(kv_heads * dim), ROWS=ROWS)
        return flat
    slots = gather_slots(torch.stack([k, v], dim=1), slot_tokens, covered)  # [W, block, 2, Hkv, D]
    return slots.permute(2, 0, 3, 1, 4).reshape(2, num_blocks * kv_heads, block_size * dim)


def _folded(d_flat: Tensor, token_slot_rows: Tensor, k: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
    """The gather's adjoint: dk, dv [T, Hkv, D] from the rows' gradient [2, W * Hkv, block * D]."""
    kv_heads, dim = k.shape[1:]
    block_size = d_flat.shape[2] // dim
    num_slots = d_flat.shape[1] // kv_heads * block_size
    if fused:
        dk, dv = torch.empty_like(k), torch.empty_like(k)
        if k.shape[0]:  # with no block, every token's slots are "none": zeros are written
            fold_blocks[(triton.cdiv(k.shape[0], 16 * ROWS),)](
                GRAD=d_flat, TOKEN_SLOT_ROWS=token_slot_rows, DK=dk, DV=dv, n_tokens=k.shape[0], n_slots=num_slots,
                HKV=kv_heads, D=dim, SLOTS=block_size, PER_TOKEN=token_slot_rows.shape[1],
                BLOCK_C=triton.next_power_of_2(kv_heads * dim), ROWS=16 * ROWS)
        return dk, dv
    # back to slots [W * block, 2, Hkv, D] (uncovered slots' rows are never read), then each token sums its slots
    slots = d_flat.view(2, -1, kv_heads, block_size, dim).permute(1, 3, 0, 2, 4)
    d_kv = sum_slots(slots.reshape(num_slots, 2, kv_heads, dim), token_slot_rows)  # [T, 2, Hkv, D]
    return d_kv[:, 0].contiguous(), d_kv[:, 1].contiguous()


def _hidden(flat: Tensor, positions: Tensor, hidden_weight: Tensor, hidden_bias: Tensor) -> Tensor:
    # (block + positions) @ W + b = block @ W + (positions @ W + b): the position term is one row per MLP
    first_bias = torch.baddbmm(hidden_bias[:, None], positions.flatten(1)[:, None], hidden_weight)
    return torch.relu(torch.baddbmm(first_bias, flat, hidden_weight))


def _forward(k: Tensor, v: Tensor, slot_tokens: Tensor, covered: Tensor, token_slot_rows: Tensor, valid: Tensor,
             positions: Tensor, hidden_weight: Tensor, hidden_bias: Tensor, output_weight: Tensor,
             output_bias: Tensor, keep_activations: bool, fused: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Compressed keys and values stacked, [2, W, Hkv, D] (rows where `valid` [W] is false are zero; an empty
    `valid` means every row is a block), then what the backward reads: the MLPs' gathered input and hidden layer
    ([0, 0, 0] each unless `keep_activations`). token_slot_rows is the backward's, taken here so that it is saved.
    The parameters are used in k's dtype."""
    positions, hidden_weight, hidden_bias, output_weight, output_bias = _in_dtype(
        k.dtype, positions, hidden_weight, hidden_bias, output_weight, output_bias)
    flat = _gathered(k, v, slot_tokens, covered, fused)
    hidden = _hidden(flat, positions, hidden_weight, hidden_bias)
    compressed = torch.baddbmm(output_bias[:, None], hidden, output_weight)
    compressed = compressed.view(2, slot_tokens.shape[0], k.shape[1], k.shape[2])
    if valid.numel():
        compressed = compressed.where(valid[None, :, None, None], 0)
    if not keep_activations:
        flat, hidden = flat.new_empty(0, 0, 0), flat.new_empty(0, 0, 0)
    return compressed, flat, hidden


def _forward_fake(k, v, slot_tokens, covered, token_slot_rows, valid, positions, hidden_weight, hidden_bias,
                  output_weight, output_bias, keep_activations, fused):
    num_blocks, block_size = slot_tokens.shape
    rows, width = (2, num_blocks * k.shape[1], block_size * k.shape[2]), hidden_weight.shape[-1]
    kept = (lambda *shape: k.new_empty(shape)) if keep_activations else (lambda *shape: k.new_empty(0, 0, 0))
    return k.new_empty(2, num_blocks, *k.shape[1:]), kept(*rows), kept(*rows[:2], width)


def _in_dtype(dtype: torch.dtype, *tensors: Tensor) -> list[Tensor]:
    return [t.to(dtype) for t in tensors]


def _column_sums(x: Tensor) -> Tensor:
    """[2, N, C] -> [2, C] as a matmul with a row of ones: one tensor-core pass over x, where a reduction over its
    long first dimension runs slowly in eager PyTorch."""
    return torch.bmm(x.new_ones(x.shape[0], 1, x.shape[1]), x).squeeze(1)


def _backward_impl(k: Tensor, v: Tensor, slot_tokens: Tensor, covered: Tensor, token_slot_rows: Tensor, valid: Tensor,
                   positions: Tensor, hidden_weight: Tensor, hidden_bias: Tensor, output_weight: Tensor, flat: Tensor,
                   hidden: Tensor, grad: Tensor,
                   fused: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dk, dv and the gradients of positions, hidden weight and bias, output weight and bias, from the compressed
    keys' and values' gradient `grad` [2, W, Hkv, D] (in k's dtype; the parameters' gradients in their own dtype);
    the activations are recomputed where the forward kept none."""
    parameter_dtypes = [p.dtype for p in (positions, hidden_weight, hidden_bias, output_weight, positions)]
    positions, hidden_weight, hidden_bias, output_weight = _in_dtype(
        k.dtype, positions, hidden_weight, hidden_bias, output_weight)
    if valid.numel():
        grad = grad.where(valid[None, :, None, None], 0)
    grad = grad.reshape(2, -1, k.shape[2])  # [2, W * Hkv, D]
    if flat.shape[0] == 0:  # not kept
        flat = _gathered(k, v, slot_tokens, covered, fused)
        hidden = _hidden(flat, positions, hidden_weight, hidden_bias)
    d_output_bias = _column_sums(grad)
    d_output_weight = torch.bmm(hidden.transpose(1, 2), grad)
    # through the relu: relu's own backward, one kernel
    d_hidden = torch.ops.aten.threshold_backward(torch.bmm(grad, output_weight.transpose(1, 2)), hidden, 0)
    d_hidden_bias = _column_sums(d_hidden)  # also the gradient of the position row's product
    d_hidden_weight = torch.baddbmm(torch.bmm(flat.transpose(1, 2), d_hidden), positions.flatten(1)[:, :, None],
                                    d_hidden_bias[:, None])
    d_positions = torch.bmm(d_hidden_bias[:, None], hidden_weight.transpose(1, 2)).view(positions.shape)
    d_flat = torch.bmm(d_hidden, hidden_weight.transpose(1, 2))  # [2, W * Hkv, block * D]
    dk, dv = _folded(d_flat, token_slot_rows, k, fused)
    # each parameter's gradient in its dtype (the output bias, which the backward does not take, in the positions')
    grads = (d_positions, d_hidden_weight, d_hidden_bias, d_output_weight, d_output_bias)
    return dk, dv, *(g.to(dtype) for g, dtype in zip(grads, parameter_dtypes))


def _backward_fake(k, v, slot_tokens, covered, token_slot_rows, valid, positions, hidden_weight, hidden_bias,
                   output_weight, flat, hidden, grad, fused):
    return (torch.empty_like(k), torch.empty_like(v), torch.empty_like(positions), torch.empty_like(hidden_weight),
            torch.empty_like(hidden_bias), torch.empty_like(output_weight), positions.new_empty(2, k.shape[2]))


def _setup_context(ctx, inputs, output):
    *tensors, output_bias, _, ctx.fused = inputs
    ctx.save_for_backward(*tensors[:10], *output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero gradients for the saved activations


def _backward(ctx, grad, *_):
    if grad is None:
        return (None,) * 13
    saved = ctx.saved_tensors
    if torch.is_grad_enabled():  # a double backward: the written-out backward in plain, differentiable PyTorch,
        # recomputing the activations from the inputs (the saved ones carry no graph)
        unkept = saved[0].new_empty(0, 0, 0)
        dk, dv, *weights = _backward_impl(*saved[:10], unkept, unkept, grad.contiguous(), False)
    else:
        dk, dv, *weights = _BACKWARD(*saved, grad.contiguous(), ctx.fused)
    return dk, dv, None, None, None, None, *weights, None, None


_BACKWARD = define_op("compress_blocks_backward", _backward_impl, _backward_fake)
_FORWARD = define_op("compress_blocks_forward", _forward, _forward_fake, _backward, _setup_context)
