"""Full-softmax cross-entropy over the item vocabulary without holding all B x L x n_items logits, in PyTorch.

The reference for the fused Triton loss (fused_cross_entropy.py) and its fallback on the CPU; float32 throughout.

The loss needs every item's score at every position; at 100k positions and 12k items those logits alone would take
5 GB. Here the forward pass forms one chunk of logits at a time, turns it into its loss and its gradients, and frees
it; backward only scales the stored gradients.
"""

import torch

CHUNK_ELEMENTS = 2**26  # logits per chunk: 256 MB in float32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, grad_enabled):
        # grad mode is always off inside forward: the caller tells whether gradients will be asked for
        need_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        need_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        count = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            weight32 = weight.float()
            total = hidden.new_zeros((), dtype=torch.float32)
            hidden_grad = torch.empty_like(hidden, dtype=torch.float32) if need_hidden_grad else None
            weight_grad = torch.zeros_like(weight32) if need_weight_grad else None
            for start in range(0, count, chunk_size):
                chunk = hidden[start:start + chunk_size].float()
                target = targets[start:start + chunk_size]
                logits = chunk @ weight32.T
                logits[:, 0] = float("-inf")  # the padding id is never a candidate
                log_norm = torch.logsumexp(logits, dim=-1)
                total += (log_norm - logits.gather(1, target[:, None]).squeeze(1)).sum()
                if need_hidden_grad or need_weight_grad:
                    probs = torch.exp(logits.sub_(log_norm[:, None]))
                    probs[torch.arange(len(target), device=probs.device), target] -= 1.0
                    probs /= count
                    if need_hidden_grad:
                        hidden_grad[start:start + chunk_size] = probs @ weight32
                    if need_weight_grad:
                        weight_grad += probs.T @ chunk
        ctx.save_for_backward(hidden_grad, weight_grad)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        hidden_grad, weight_grad = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (
            (hidden_grad * grad_output).to(hidden_dtype) if hidden_grad is not None else None,
            (weight_grad * grad_output).to(weight_dtype) if weight_grad is not None else None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Mean of -log softmax(hidden @ weight.T)[target] over rows; column 0 (padding) is left out of the softmax.

    hidden [N, d], weight [V, d], targets [N] in 1..V-1. With N = 0 the loss is 0 (and still part of the graph).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, torch.is_grad_enabled())
