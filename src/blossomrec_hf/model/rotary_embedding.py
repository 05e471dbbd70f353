"""Rotary position embeddings (RoPE) of the attention's queries and keys: tables, a plain PyTorch rotation (the
reference, used on the CPU), and a fused Triton rotation used on CUDA.

The fused version reads queries and keys straight out of the attention's input projection (a strided view), rotates
them in float32 and writes compact query and key tensors in one pass, and rotates their gradients back in one pass:
about a dozen elementwise and copy kernels fewer per layer and step than the PyTorch version. Both passes are custom
operators (custom_ops.py), so torch.compile(fullgraph=True) traces through them.
"""

import torch

from .custom_ops import define_op

try:
    import triton
except ImportError:
    triton = None

if triton is not None:
    from .triton_rotary_kernels import rotary_backward, rotary_forward

ROWS = 32


def rotary_tables(length: int, dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [L, D] of rotary position embeddings for positions 0..L-1 (both halves equal)."""
    inverse_frequency = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inverse_frequency)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., L, heads, D] by the tables [L, D], in x's dtype (bf16 stays bf16 under autocast)."""
    cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _launch_shape(heads: int, dim: int) -> dict:
    return dict(HALF=dim // 2, BLOCK_HEADS=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(dim // 2),
                ROWS=ROWS)


def _forward(query_key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated compact queries [B, L, H, D] and keys [B, L, H_kv, D] of query_key [B, L, H + H_kv, D] (any batch and
    position strides; other layouts are copied first)."""
    batch, length, heads, dim = query_key.shape
    if query_key.stride(3) != 1 or query_key.stride(2) != dim:
        query_key = query_key.contiguous()
    q, k = _empty_rotated(query_key, cos, sin, num_heads)
    rotary_forward[(triton.cdiv(batch * length, ROWS),)](
        query_key, *_tables(cos, sin), q, k, sxb=query_key.stride(0), sxl=query_key.stride(1), n_rows=batch * length,
        L=length, H=num_heads, HKV=heads - num_heads, **_launch_shape(heads, dim))
    return q, k


def _empty_rotated(query_key, cos, sin, num_heads):
    """The outputs, unwritten: the operator's fake implementation and the real one's buffers."""
    *rows, heads, dim = query_key.shape
    return query_key.new_empty(*rows, num_heads, dim), query_key.new_empty(*rows, heads - num_heads, dim)


def _backward_impl(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient [B, L, H + H_kv, D] of query_key from those of the queries and keys (any strides)."""
    dq = dq if dq.stride(-1) == 1 else dq.contiguous()
    dk = dk if dk.stride(-1) == 1 else dk.contiguous()
    batch, length, num_heads, dim = dq.shape
    kv_heads = dk.shape[2]
    dx = _empty_gradient(dq, dk, cos, sin)
    rotary_backward[(triton.cdiv(batch * length, ROWS),)](
        dq, dk, *_tables(cos, sin), dx, sqb=dq.stride(0), sql=dq.stride(1), sqh=dq.stride(2), skb=dk.stride(0),
        skl=dk.stride(1), skh=dk.stride(2), n_rows=batch * length, L=length, H=num_heads, HKV=kv_heads,
        **_launch_shape(num_heads + kv_heads, dim))
    return dx


def _empty_gradient(dq, dk, cos, sin):
    """The output, unwritten: the operator's fake implementation and the real one's buffer."""
    *rows, num_heads, dim = dq.shape
    return dq.new_empty(*rows, num_heads + dk.shape[2], dim)


def _tables(cos, sin):
    return [table.to(torch.float32).contiguous() for table in (cos, sin)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:3])


def _backward(ctx, dq, dk):
    return _BACKWARD(dq, dk, *ctx.saved_tensors), None, None, None


_BACKWARD = define_op("rotary_backward", _backward_impl, _empty_gradient)
_FORWARD = define_op("rotary_forward", _forward, _empty_rotated, _backward, _setup_context)


def rotate_queries_and_keys(query_key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                            fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """query_key [B, L, H + H_kv, D] -> rotated queries [B, L, H, D] and keys [B, L, H_kv, D].

    `fused`: None = the Triton kernels (a custom operator, custom_ops.py) on CUDA tensors when triton imports (even
    head dims), PyTorch otherwise.
    """
    if fused is None:
        fused = triton is not None and query_key.is_cuda
    if not fused or query_key.shape[-1] % 2:
        return apply_rotary(query_key, cos, sin).split([num_heads, query_key.shape[2] - num_heads], dim=2)
    return _FORWARD(query_key, cos, sin, num_heads)
