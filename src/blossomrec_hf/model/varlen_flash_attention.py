"""Dense causal attention over packed histories on torch's variable-length flash attention, as a custom operator of
this package, for compiled models.

torch's `varlen_attn` is itself a pair of custom operators (`torch_attn::_varlen_attn` and its backward). Compiled
inside the dense model on CUDA, inductor failed to lower them (torch 2.11, H100: `NotImplementedError: SliceView`),
while this package's own operators, which take the same queries, keys and values, compile. This operator calls
torch's pair at run time, out of inductor's sight, and takes the histories' boundaries as the model keeps them
(int32 or int64; the kernels' int32 copy is made inside). Eager steps keep calling `varlen_attn` directly.
"""

import torch

from .custom_ops import define_op


def _flash_operators():
    """(forward, backward) of torch's varlen flash attention, or None where this torch has none."""
    try:  # importing the module defines the operators (torch >= 2.10)
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return None
    namespace = getattr(torch.ops, "torch_attn", None)
    if namespace is None or not hasattr(namespace, "_varlen_attn") or not hasattr(namespace, "_varlen_attn_backward"):
        return None
    return namespace._varlen_attn, namespace._varlen_attn_backward


# Read once, at import: a compiled graph must not trace lookups into torch.ops.
FLASH_OPERATORS = _flash_operators()
# whether torch's forward takes fewer key/value heads than query heads (`enable_gqa`; else one kv head per query head)
TAKES_GROUPED_HEADS = FLASH_OPERATORS is not None and any(
    argument.name == "enable_gqa" for argument in FLASH_OPERATORS[0].default._schema.arguments)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
             max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output [T, H, D], log-sum-exp [H, T], the kernel's random state) of causal attention within each history."""
    forward, _ = FLASH_OPERATORS
    bounds = cu_seqlens.to(torch.int32)
    grouped = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return tuple(forward(q, k, v, bounds, bounds, max_length, max_length, is_causal=True, **grouped))


def _forward_fake(q, k, v, cu_seqlens, max_length):
    return (torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32),
            q.new_empty(2, dtype=torch.uint64))


def _backward_impl(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, rng_state: torch.Tensor, cu_seqlens: torch.Tensor,
                   max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, backward = FLASH_OPERATORS
    bounds = cu_seqlens.to(torch.int32)
    return backward(grad_out.contiguous(), q, k, v, out, lse, bounds, bounds, max_length, max_length, True,
                    rng_state)


def _backward_fake(grad_out, q, k, v, out, lse, rng_state, cu_seqlens, max_length):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_length = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.max_length = max_length


def _backward(ctx, grad_out, grad_lse, grad_rng_state):
    q, k, v, out, lse, rng_state, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _BACKWARD(grad_out, q, k, v, out, lse, rng_state, cu_seqlens, ctx.max_length)
    return dq, dk, dv, None, None


_BACKWARD = define_op("varlen_flash_attention_backward", _backward_impl, _backward_fake)
_FORWARD = define_op("varlen_flash_attention", _forward, _forward_fake, _backward, _setup_context)


def varlen_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_length: int) -> torch.Tensor:
    """Causal attention of q [T, H, D] over k, v [T, Hkv, D] within each history (bounds `cu_seqlens` [S + 1],
    lengths at most `max_length`) -> [T, H, D]. Hkv < H only where TAKES_GROUPED_HEADS."""
    return _FORWARD(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_length)[0]
