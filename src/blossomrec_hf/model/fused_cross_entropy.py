"""The item-softmax cross-entropy on the tensor cores: scores computed twice per training step and never stored.

`linear_cross_entropy(hidden, weight, targets)` is the mean over rows of -log softmax(hidden @ weight.T)[target] with
column 0 (padding) left out, over the rows whose target is not `ignore_index` (the model passes every position, so
that no shape depends on the data). On CUDA it runs the Triton kernels of triton_cross_entropy_kernels.py; on the
CPU, or without triton, the PyTorch reference of chunked_cross_entropy.py (`fused=True` runs the kernels on CPU
tensors under TRITON_INTERPRET=1, which is how the tests compare the two). Both are custom operators
(custom_ops.py): torch.compile(fullgraph=True) traces forward and backward through them, and nothing in them waits
for the GPU.

Precision: the operands are taken in the autocast dtype when autocast is on (as a matmul would be; decided here,
since the operators run with autocast off), else in the inputs' dtype; products accumulate in float32, the softmax
is float32, and float32 operands take the dot-product precision of torch.get_float32_matmul_precision() (exact by
default; custom_ops.py); gradients come back in the inputs' dtypes. The forward pass computes the log-sum-exp and the
softmax-weighted item sum of every row (the hidden state's gradient needs nothing else); the backward pass computes
the item embeddings' gradient. No atomics: results are bitwise reproducible.
"""

import math

import torch

from .chunked_cross_entropy import IGNORE_INDEX, chunked_linear_cross_entropy, kept_count, scaled_gradient
from .custom_ops import define_op, dot_precision, kernels_run_on
from .tile_fitting import fit_tiles

try:
    import triton
except ImportError:
    triton = None

if triton is not None:
    from .triton_cross_entropy_kernels import item_gradient, softmax_forward

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows and items per tile and warps of each kernel, the fastest of scripts/benchmark_loss.py --tune on an H200 at
# 20k, 200k and 1M items (bf16, d 128); `programs_per_sm`: launches with fewer tiles than this many per
# multiprocessor split their loop (items in the forward, rows in the item gradient) into parallel parts.
TUNING = dict(forward_rows=128, forward_items=64, forward_warps=8, gradient_rows=64, gradient_items=64,
              gradient_warps=4, programs_per_sm=4)
LN2 = math.log(2.0)


def fused_unavailable_reason(hidden: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None when they can."""
    if triton is None:
        return "triton is not installed"
    if not kernels_run_on(hidden):
        return f"{hidden.device.type} tensors (the kernels need CUDA, or TRITON_INTERPRET=1)"
    if hidden.shape[-1] > 256:
        return f"hidden size {hidden.shape[-1]} > 256"
    if compute_dtype(hidden, weight) not in SUPPORTED_DTYPES:
        return f"dtype {compute_dtype(hidden, weight)}"
    return None


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The operands' dtype: autocast's where it is on, else the wider of the two inputs'."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _programs_wanted(device: torch.device) -> int:
    if device.type != "cuda":
        return TUNING["programs_per_sm"]
    return TUNING["programs_per_sm"] * torch.cuda.get_device_properties(device).multi_processor_count


def _split(length: int, blocks: int, block: int, device: torch.device) -> tuple[int, int]:
    """(parts, length per part, a multiple of `block`) so that blocks x parts programs fill the device."""
    tiles = max(1, triton.cdiv(length, block))
    parts = max(1, min(tiles, triton.cdiv(_programs_wanted(device), max(blocks, 1))))
    per_part = triton.cdiv(tiles, parts) * block
    return triton.cdiv(length, per_part), per_part


def _common(hidden: torch.Tensor) -> dict:
    dim = hidden.shape[1]
    return dict(D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
                DOT_PREC=dot_precision(hidden.dtype))


def with_fitting_rows(kernel_name: str, hidden: torch.Tensor, launch, variant=None):
    """`launch(rows_tile)` with the tuned rows per tile, fewer where the GPU lacks the shared memory (tile_fitting);
    `variant`: what else sets the kernel's shared memory."""
    key = (kernel_name, hidden.dtype, hidden.shape[1], dot_precision(hidden.dtype), hidden.device, variant,
           tuple(sorted(TUNING.items())))
    return fit_tiles(key, {"rows": TUNING[f"{kernel_name}_rows"]}, {"rows": 16}, lambda tiles: launch(tiles["rows"]))


def softmax_statistics(hidden, weight, targets, ignore_index: int, with_grad: bool):
    """Per row [N]: the base-2 log-sum-exp over items 1.. and the loss (natural log, 0 on ignored rows); with
    `with_grad` also the unscaled gradient of the loss in hidden [N, D] float32 (softmax-weighted item sum minus the
    target's embedding, 0 on ignored rows). The item range is split into parts when there are too few row blocks to
    fill the device."""
    return with_fitting_rows("forward", hidden, lambda rows_tile: _softmax_statistics(
        hidden, weight, targets, ignore_index, with_grad, rows_tile), variant=with_grad)


def _softmax_statistics(hidden, weight, targets, ignore_index: int, with_grad: bool, rows_tile: int):
    rows, dim = hidden.shape
    items_tile = TUNING["forward_items"]
    row_blocks = triton.cdiv(rows, rows_tile)
    parts, per_part = _split(weight.shape[0] - 1, row_blocks, items_tile, hidden.device)
    lse, target_score = torch.empty(2, parts, rows, device=hidden.device, dtype=torch.float32)
    weighted = torch.empty(parts, rows, dim, device=hidden.device, dtype=torch.float32) if with_grad else lse
    softmax_forward[(row_blocks, parts)](
        hidden, weight, targets, lse, target_score, weighted, N=rows, V=weight.shape[0], items_per_split=per_part,
        stride_h=hidden.stride(0), stride_e=weight.stride(0), ignore_index=ignore_index, BM=rows_tile, BV=items_tile,
        WITH_GRAD=with_grad, SUBTRACT_TARGET=parts == 1, num_warps=TUNING["forward_warps"], **_common(hidden))
    kept = targets != ignore_index
    if parts == 1:
        lse, target_score, weighted = lse[0], target_score[0], weighted[0]
    else:
        lse, target_score, weighted = _combine_parts(lse, target_score, weighted, weight, targets, kept, with_grad)
    return lse, torch.where(kept, lse - target_score, 0.0) * LN2, weighted if with_grad else None


def _combine_parts(lse, target_score, weighted, weight, targets, kept, with_grad: bool):
    """The statistics over all items from those of each part of the item range, added in a fixed order."""
    total = torch.logsumexp(lse * LN2, dim=0) / LN2
    if not with_grad:
        return total, target_score.sum(0), None
    target_embedding = weight[targets.masked_fill(~kept, 0)] * kept[:, None]
    return total, target_score.sum(0), torch.einsum("sn,snd->nd", torch.exp2(lse - total), weighted) - target_embedding


def item_embedding_gradient(hidden, weight, lse, targets, scale, ignore_index: int, dtype) -> torch.Tensor:
    """`scale` times the sum over kept rows of (softmax - one-hot target) times hidden, for every item: [V, D] in
    `dtype` (row 0, padding, zero). Written by the kernel directly unless the rows are split into parts."""
    return with_fitting_rows("gradient", hidden, lambda rows_tile: _item_embedding_gradient(
        hidden, weight, lse, targets, scale, ignore_index, dtype, rows_tile))


def _item_embedding_gradient(hidden, weight, lse, targets, scale, ignore_index: int, dtype, rows_tile: int):
    rows, dim = hidden.shape
    items = weight.shape[0]
    items_tile = TUNING["gradient_items"]
    item_blocks = triton.cdiv(items - 1, items_tile)
    parts, per_part = _split(rows, item_blocks, rows_tile, hidden.device)
    grad = torch.empty(items, dim, device=hidden.device, dtype=dtype)
    grad[0] = 0
    partial = torch.empty(parts, items, dim, device=hidden.device, dtype=torch.float32) if parts > 1 else grad
    item_gradient[(item_blocks, parts)](
        hidden, weight, lse, targets, scale, partial, N=rows, V=items, rows_per_split=per_part,
        stride_h=hidden.stride(0), stride_e=weight.stride(0), ignore_index=ignore_index, BM=rows_tile, BV=items_tile,
        PARTIAL=parts > 1, num_warps=TUNING["gradient_warps"], **_common(hidden))
    if parts > 1:
        torch.mul(partial[:, 1:].sum(0), scale, out=grad[1:])
    return grad


def _operands(hidden, weight, dtype):
    return hidden.to(dtype).contiguous(), weight.to(dtype).contiguous()


def _forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
             dtype: torch.dtype, hidden_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss over kept rows, base-2 log-sum-exp [N], the summed loss's gradient in hidden [N, D] float32 or
    [0, D] when not asked), with operands in `dtype`."""
    lse, row_loss, d_hidden = softmax_statistics(*_operands(hidden, weight, dtype), targets.contiguous(),
                                                 ignore_index, hidden_grad)
    if d_hidden is None:
        d_hidden = hidden.new_empty(0, hidden.shape[1], dtype=torch.float32)
    return row_loss.sum() / kept_count(targets, ignore_index), lse, d_hidden


def _forward_fake(hidden, weight, targets, ignore_index, dtype, hidden_grad):
    rows = hidden.shape[0] if hidden_grad else 0
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape[0], dtype=torch.float32),
            hidden.new_empty(rows, hidden.shape[1], dtype=torch.float32))


def _backward_impl(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                   scale: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """The item embeddings' gradient [V, D] in weight's dtype; `scale`: upstream gradient / kept rows."""
    h, e = _operands(hidden, weight, dtype)
    return item_embedding_gradient(h, e, lse, targets.contiguous(), scale, ignore_index, weight.dtype)


def _backward_fake(hidden, weight, targets, lse, scale, ignore_index, dtype):
    return weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, ignore_index, dtype, _ = inputs
    ctx.save_for_backward(hidden, weight, targets, *output[1:])
    ctx.ignore_index, ctx.dtype = ignore_index, dtype


def _backward(ctx, grad_loss, *_):
    hidden, weight, targets, lse, d_hidden = ctx.saved_tensors
    scale = grad_loss / kept_count(targets, ctx.ignore_index)
    grad_hidden = scaled_gradient(d_hidden, scale, hidden.dtype) if ctx.needs_input_grad[0] else None
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = _BACKWARD(hidden, weight, targets, lse, scale, ctx.ignore_index, ctx.dtype)
    return grad_hidden, grad_weight, None, None, None, None


_BACKWARD = define_op("linear_cross_entropy_backward", _backward_impl, _backward_fake)
_FORWARD = define_op("linear_cross_entropy_forward", _forward, _forward_fake, _backward, _setup_context)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, fused: bool | None = None) -> torch.Tensor:
    """Mean of -log softmax(hidden @ weight.T)[target] over rows whose target is not `ignore_index`; column 0
    (padding) is left out of the softmax.

    hidden [N, d], weight [V, d], targets [N] in 1..V-1 or `ignore_index`. With no such row (or N = 0) the loss is 0
    (and still part of the graph). `fused`: None takes the Triton kernels for CUDA tensors, True insists on them,
    False takes the PyTorch path.
    """
    if fused is None:
        fused = hidden.device.type == "cuda" and fused_unavailable_reason(hidden, weight) is None
    elif fused and fused_unavailable_reason(hidden, weight) is not None:
        raise ValueError(f"the fused cross-entropy cannot run here: {fused_unavailable_reason(hidden, weight)}")
    if hidden.shape[0] == 0 or not fused:
        return chunked_linear_cross_entropy(hidden, weight, targets, ignore_index)
    hidden_grad = torch.is_grad_enabled() and hidden.requires_grad
    loss, _, _ = _FORWARD(hidden, weight, targets, ignore_index, compute_dtype(hidden, weight), hidden_grad)
    return loss
