"""The fused Triton rotary embedding (run by the interpreter on the CPU) against the plain PyTorch rotation."""

import pytest
import torch

from blossomrec_hf.model.rotary_embedding import apply_rotary, rotary_tables, rotate_queries_and_keys
from triton_support import requires_triton

pytestmark = requires_triton


@pytest.mark.parametrize("batch, length, heads, kv_heads, dim", [
    (1, 1, 1, 1, 16), (2, 37, 8, 2, 16), (3, 5, 4, 4, 24), (1, 70, 6, 3, 48), (2, 9, 2, 1, 128),
])
def test_fused_rotation_matches_pytorch_forward_and_backward(batch, length, heads, kv_heads, dim):
    generator = torch.Generator().manual_seed(length * heads + dim)
    extra = 7  # the queries and keys are a strided view into a wider projection, as in the model
    projection = torch.randn(batch, length, (heads + kv_heads) * dim + extra, generator=generator,
                             requires_grad=True)
    query_key = projection[..., :(heads + kv_heads) * dim].view(batch, length, heads + kv_heads, dim)
    cos, sin = rotary_tables(length, dim, 10000.0, "cpu", torch.float32)
    fused = rotate_queries_and_keys(query_key, cos, sin, heads, fused=True)
    plain = apply_rotary(query_key, cos, sin).split([heads, kv_heads], dim=2)
    weights = [torch.randn(t.shape, generator=generator) for t in plain]
    for got, want in zip(fused, plain):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # gradients arrive with any strides (the attention kernels return [B, H, L, D]-shaped memory for keys)
    grads = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in weights]
    got = torch.autograd.grad(fused, projection, grads)[0]
    want = torch.autograd.grad(plain, projection, grads)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rotation_keeps_each_pair_norm_and_position_zero():
    query_key = torch.randn(2, 6, 3, 16)
    cos, sin = rotary_tables(6, 16, 10000.0, "cpu", torch.float32)
    q, k = rotate_queries_and_keys(query_key, cos, sin, 2, fused=True)
    rotated = torch.cat([q, k], dim=2)
    torch.testing.assert_close(rotated[:, 0], query_key[:, 0])
    pair_norms = query_key[..., :8] ** 2 + query_key[..., 8:] ** 2
    torch.testing.assert_close(rotated[..., :8] ** 2 + rotated[..., 8:] ** 2, pair_norms)
