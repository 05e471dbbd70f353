"""Full-softmax cross-entropy over the item vocabulary without holding all B x L x n_items logits, in PyTorch.

The reference for the fused Triton loss (fused_cross_entropy.py) and its fallback on the CPU; float32 throughout.

The loss needs every item's score at every position; at 100k positions and 12k items those logits alone would take
5 GB. Here the forward pass forms one chunk of logits at a time, turns it into its loss and its gradients, and frees
it; backward only scales the stored gradients. The forward is the custom operator
`chunked_linear_cross_entropy_forward` (custom_ops.py), so torch.compile traces it as one call with no graph break.

Rows whose target is `ignore_index` take no part (the model passes every position, static shapes, no host sync): the
mean is over the other rows, and is 0 when there are none.
"""

import torch

from .custom_ops import define_op

CHUNK_ELEMENTS = 2**26  # logits per chunk: 256 MB in float32
IGNORE_INDEX = -100


def kept_count(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """How many rows the mean is over, on the device; at least 1, so that only ignored rows give 0, not NaN."""
    return (targets != ignore_index).sum().clamp(min=1)


def scaled_gradient(gradient: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gradient * scale written in `dtype` by one kernel."""
    return torch.mul(gradient, scale, out=torch.empty_like(gradient, dtype=dtype))


def _chunk_loss(chunk, weight, targets, kept, with_grad: bool):
    """Summed loss of one chunk's kept rows and, with `with_grad`, d loss / d logits [rows, V] (0 on ignored rows).
    `targets` holds 0 on ignored rows, so that every index is valid."""
    logits = chunk @ weight.T
    logits[:, 0] = float("-inf")  # the padding id is never a candidate
    log_norm = torch.logsumexp(logits, dim=-1)
    loss = torch.where(kept, log_norm - logits.gather(1, targets[:, None]).squeeze(1), 0.0).sum()
    if not with_grad:
        return loss, None
    row_weight = kept.float()
    probs = torch.exp(logits.sub_(log_norm[:, None])).mul_(row_weight[:, None])
    probs[torch.arange(len(targets), device=probs.device), targets] -= row_weight
    return loss, probs


def _forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_size: int,
             hidden_grad: bool, weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss over kept rows, the summed loss's gradient in hidden [N, d] and in weight [V, d], float32; a
    gradient not asked for is [0, d])."""
    weight32 = weight.float()
    kept = targets != ignore_index
    safe_targets = targets.long().masked_fill(~kept, 0)
    total = hidden.new_zeros((), dtype=torch.float32)
    hidden_shape, weight_shape = _gradient_shapes(hidden, weight, hidden_grad, weight_grad)
    d_hidden = torch.empty(hidden_shape, device=hidden.device, dtype=torch.float32)
    d_weight = torch.zeros(weight_shape, device=hidden.device, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = hidden[rows].float()
        loss, probs = _chunk_loss(chunk, weight32, safe_targets[rows], kept[rows], hidden_grad or weight_grad)
        total += loss
        if hidden_grad:
            d_hidden[rows] = probs @ weight32
        if weight_grad:
            d_weight += probs.T @ chunk
    return total / kept_count(targets, ignore_index), d_hidden, d_weight


def _gradient_shapes(hidden, weight, hidden_grad: bool, weight_grad: bool):
    return (hidden.shape[0] if hidden_grad else 0, hidden.shape[1]), (weight.shape[0] if weight_grad else 0,
                                                                      weight.shape[1])


def _forward_fake(hidden, weight, targets, ignore_index, chunk_size, hidden_grad, weight_grad):
    shapes = _gradient_shapes(hidden, weight, hidden_grad, weight_grad)
    return hidden.new_empty((), dtype=torch.float32), *(hidden.new_empty(shape, dtype=torch.float32)
                                                        for shape in shapes)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, ignore_index = inputs[:4]
    ctx.save_for_backward(targets, *output[1:])
    ctx.ignore_index, ctx.dtypes = ignore_index, (hidden.dtype, weight.dtype)


def _backward(ctx, grad_loss, *_):
    targets, d_hidden, d_weight = ctx.saved_tensors
    scale = grad_loss / kept_count(targets, ctx.ignore_index)
    grads = [scaled_gradient(grad, scale, dtype) if needed else None
             for grad, dtype, needed in zip((d_hidden, d_weight), ctx.dtypes, ctx.needs_input_grad)]
    return *grads, None, None, None, None, None


_FORWARD = define_op("chunked_linear_cross_entropy_forward", _forward, _forward_fake, _backward, _setup_context)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> torch.Tensor:
    """Mean of -log softmax(hidden @ weight.T)[target] over rows whose target is not `ignore_index`; column 0
    (padding) is left out of the softmax.

    hidden [N, d], weight [V, d], targets [N] in 1..V-1 or `ignore_index`. With no such row (or N = 0) the loss is 0
    (and still part of the graph).
    """
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
    grad = torch.is_grad_enabled()
    loss, _, _ = _FORWARD(hidden, weight, targets, ignore_index, chunk_size, grad and hidden.requires_grad,
                          grad and weight.requires_grad)
    return loss
