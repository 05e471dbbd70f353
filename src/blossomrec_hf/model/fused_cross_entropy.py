"""The item-softmax cross-entropy on the tensor cores: scores computed twice per training step and never stored.

`linear_cross_entropy(hidden, weight, targets)` is the mean over rows of -log softmax(hidden @ weight.T)[target] with
column 0 (padding) left out. On CUDA it runs the Triton kernels of triton_cross_entropy_kernels.py; on the CPU, or
without triton, the PyTorch reference of chunked_cross_entropy.py (`fused=True` runs the kernels on CPU tensors
under TRITON_INTERPRET=1, which is how the tests compare the two).

Precision: the operands are taken in the autocast dtype when autocast is on (as a matmul would be), else in the
inputs' dtype; products accumulate in float32, the softmax is float32, and float32 operands use exact (not tf32)
dot products. The forward pass computes the log-sum-exp and the softmax-weighted item sum of every row (the hidden
state's gradient needs nothing else); the backward pass computes the item embeddings' gradient. No atomics: results
are bitwise reproducible.
"""

import math
import os

import torch

from .chunked_cross_entropy import chunked_linear_cross_entropy

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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_unavailable_reason(hidden: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None when they can."""
    if triton is None:
        return "triton is not installed"
    if hidden.device.type != "cuda" and not _interpreting():
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
                DOT_PREC="ieee" if hidden.dtype == torch.float32 else "tf32")


def softmax_statistics(hidden, weight, targets, with_grad: bool):
    """Per row [N], base 2: the log-sum-exp over items 1.. and the target's score; with `with_grad` also the unscaled
    gradient of the loss in hidden [N, D] float32 (softmax-weighted item sum minus the target's embedding). The item
    range is split into parts when there are too few row blocks to fill the device."""
    rows, dim = hidden.shape
    rows_tile, items_tile = TUNING["forward_rows"], TUNING["forward_items"]
    row_blocks = triton.cdiv(rows, rows_tile)
    parts, per_part = _split(weight.shape[0] - 1, row_blocks, items_tile, hidden.device)
    lse, target_score = torch.empty(2, parts, rows, device=hidden.device, dtype=torch.float32)
    weighted = torch.empty(parts, rows, dim, device=hidden.device, dtype=torch.float32) if with_grad else lse
    softmax_forward[(row_blocks, parts)](
        hidden, weight, targets, lse, target_score, weighted, N=rows, V=weight.shape[0], items_per_split=per_part,
        stride_h=hidden.stride(0), stride_e=weight.stride(0), BM=rows_tile, BV=items_tile, WITH_GRAD=with_grad,
        SUBTRACT_TARGET=parts == 1, num_warps=TUNING["forward_warps"], **_common(hidden))
    if parts == 1:
        return lse[0], target_score[0], weighted[0] if with_grad else None
    total = torch.logsumexp(lse * LN2, dim=0) / LN2
    if not with_grad:
        return total, target_score.sum(0), None
    shares = torch.exp2(lse - total)
    return total, target_score.sum(0), torch.einsum("sn,snd->nd", shares, weighted) - weight[targets].float()


def item_embedding_gradient(hidden, weight, lse, targets, scale, dtype) -> torch.Tensor:
    """`scale` times the sum over rows of (softmax - one-hot target) times hidden, for every item: [V, D] in `dtype`
    (row 0, padding, zero). Written by the kernel directly unless the rows are split into parts."""
    rows, dim = hidden.shape
    items = weight.shape[0]
    rows_tile, items_tile = TUNING["gradient_rows"], TUNING["gradient_items"]
    item_blocks = triton.cdiv(items - 1, items_tile)
    parts, per_part = _split(rows, item_blocks, rows_tile, hidden.device)
    grad = torch.empty(items, dim, device=hidden.device, dtype=dtype)
    grad[0] = 0
    partial = torch.empty(parts, items, dim, device=hidden.device, dtype=torch.float32) if parts > 1 else grad
    item_gradient[(item_blocks, parts)](
        hidden, weight, lse, targets, scale, partial, N=rows, V=items, rows_per_split=per_part,
        stride_h=hidden.stride(0), stride_e=weight.stride(0), BM=rows_tile, BV=items_tile, PARTIAL=parts > 1,
        num_warps=TUNING["gradient_warps"], **_common(hidden))
    if parts > 1:
        torch.mul(partial[:, 1:].sum(0), scale, out=grad[1:])
    return grad


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, hidden, weight, targets, dtype, grad_enabled):
        h = hidden.detach().to(dtype).contiguous()
        e = weight.detach().to(dtype).contiguous()
        targets = targets.contiguous()
        with_grad = grad_enabled and any(ctx.needs_input_grad[:2])
        lse, target_score, hidden_grad = softmax_statistics(h, e, targets, with_grad)
        ctx.save_for_backward(h, e, targets, lse, hidden_grad)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return (lse - target_score).mean() * LN2

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_output):
        h, e, targets, lse, hidden_grad = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = (grad_output / h.shape[0]).float()
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.mul(hidden_grad, scale, out=torch.empty_like(hidden_grad, dtype=hidden_dtype))
        if ctx.needs_input_grad[1]:
            grad_weight = item_embedding_gradient(h, e, lse, targets, scale, weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         fused: bool | None = None) -> torch.Tensor:
    """Mean of -log softmax(hidden @ weight.T)[target] over rows; column 0 (padding) is left out of the softmax.

    hidden [N, d], weight [V, d], targets [N] in 1..V-1. With N = 0 the loss is 0 (and still part of the graph).
    `fused`: None takes the Triton kernels for CUDA tensors, True insists on them, False takes the PyTorch path.
    """
    if fused is None:
        fused = hidden.device.type == "cuda" and fused_unavailable_reason(hidden, weight) is None
    elif fused and fused_unavailable_reason(hidden, weight) is not None:
        raise ValueError(f"the fused cross-entropy cannot run here: {fused_unavailable_reason(hidden, weight)}")
    if hidden.shape[0] == 0 or not fused:
        return chunked_linear_cross_entropy(hidden, weight, targets)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, compute_dtype(hidden, weight),
                                          torch.is_grad_enabled())
