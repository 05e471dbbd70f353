"""Rotary position embeddings (RoPE) of the attention's queries and keys: tables, a plain PyTorch rotation (the
reference, used on the CPU), and a fused Triton rotation used on CUDA.

The fused version reads queries and keys straight out of the attention's input projection (a strided view), rotates
them in float32 and writes compact query and key tensors in one pass, and rotates their gradients back in one pass:
about a dozen elementwise and copy kernels fewer per layer and step than the PyTorch version.
"""

import torch

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


class _FusedRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query_key, cos, sin, num_heads):
        batch, length, heads, dim = query_key.shape
        kv_heads = heads - num_heads
        q = torch.empty(batch, length, num_heads, dim, dtype=query_key.dtype, device=query_key.device)
        k = torch.empty(batch, length, kv_heads, dim, dtype=query_key.dtype, device=query_key.device)
        n_rows = batch * length
        rotary_forward[(triton.cdiv(n_rows, ROWS),)](
            query_key, cos, sin, q, k, query_key.stride(0), query_key.stride(1), n_rows, length,
            H=num_heads, HKV=kv_heads, **_launch_shape(heads, dim),
        )
        ctx.save_for_backward(cos, sin)
        ctx.num_heads = num_heads
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        batch, length, num_heads, dim = dq.shape
        kv_heads = dk.shape[2]
        dx = torch.empty(batch, length, num_heads + kv_heads, dim, dtype=dq.dtype, device=dq.device)
        n_rows = batch * length
        rotary_backward[(triton.cdiv(n_rows, ROWS),)](
            dq, dk, cos, sin, dx, dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            n_rows, length, H=num_heads, HKV=kv_heads, **_launch_shape(num_heads + kv_heads, dim),
        )
        return dx, None, None, None


def rotate_queries_and_keys(query_key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                            fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """query_key [B, L, H + H_kv, D] (last dim contiguous) -> rotated queries [B, L, H, D] and keys [B, L, H_kv, D].

    `fused`: None = the Triton kernels on CUDA tensors when triton imports (even head dims), PyTorch otherwise.
    """
    if fused is None:
        fused = triton is not None and query_key.is_cuda
    if not fused or query_key.shape[-1] % 2 or query_key.stride(-1) != 1:
        return apply_rotary(query_key, cos, sin).split([num_heads, query_key.shape[2] - num_heads], dim=2)
    tables = [t.to(torch.float32).contiguous() for t in (cos, sin)]
    return _FusedRotary.apply(query_key, *tables, num_heads)
