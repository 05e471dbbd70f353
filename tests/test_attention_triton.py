"""The fused Triton BlossomRec attention against the PyTorch reference (Triton's interpreter on the CPU).

Small shapes keep the interpreter fast; the GPU sweep over long sequences, head dims and bf16 is
scripts/check_triton_attention.py.
"""

import warnings

import pytest
import torch

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.model import blossom_attention_triton as triton_backend
from blossomrec_hf.model.blossom_attention_torch import blossom_attention_torch, select_blocks
from blossomrec_hf.model.blossom_attention_triton import (
    blossom_attention_triton,
    fallback_reason,
    gated_sum,
    select_blocks_triton,
    triton_unavailable_reason,
)
from blossomrec_hf.model.sparse_patterns import SparseGeometry
from triton_support import requires_triton

pytestmark = requires_triton

DEFAULT = SparseGeometry(compress_block_size=32, compress_stride=16, selection_block_size=16,
                         num_selected_blocks=4, stis_window=8)
WIDE = SparseGeometry(compress_block_size=48, compress_stride=16, selection_block_size=16,
                      num_selected_blocks=2, stis_window=20)
TOLERANCE = 1e-3


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def random_inputs(batch, heads, kv_heads, length, dim, compressed, geometry, seed):
    generator = torch.Generator().manual_seed(seed)
    width = geometry.num_compressed_blocks(length)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_()

    q, k, v = rand(batch, heads, length, dim), rand(batch, kv_heads, length, dim), rand(batch, kv_heads, length, dim)
    ck = rand(batch, kv_heads, width, dim)
    cv = rand(batch, kv_heads, width, dim) if compressed else None
    return q, k, v, ck, cv


def as_sets(indices, width):
    padded = torch.nn.functional.pad(indices.long(), (0, width - indices.shape[-1]), value=-1)
    return padded.sort(-1).values


def outputs_and_grads(fn, inputs, geometry, weights):
    outputs = [o for o in fn(*inputs, geometry) if o is not None]
    used = [x for x in inputs if x is not None]
    grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, outputs)), used, allow_unused=True)
    return outputs, grads


def test_the_interpreter_allows_the_backend():
    assert triton_unavailable_reason() is None


@pytest.mark.parametrize("batch, heads, kv_heads, length, dim, compressed, geometry", [
    (2, 4, 2, 37, 16, True, DEFAULT),
    (1, 2, 2, 9, 16, True, DEFAULT),
    (1, 4, 1, 100, 32, False, DEFAULT),
    (1, 8, 4, 53, 24, True, DEFAULT),
    (2, 2, 1, 71, 16, False, WIDE),
])
def test_outputs_gradients_and_selection_match_the_reference(batch, heads, kv_heads, length, dim, compressed,
                                                             geometry, kernel_path):
    inputs = random_inputs(batch, heads, kv_heads, length, dim, compressed, geometry, seed=length)
    q, k, v, ck, cv = inputs
    assert fallback_reason(q, k, ck, geometry) is None
    weights = [torch.randn(q.shape) for _ in range(3)]
    reference, reference_grads = outputs_and_grads(blossom_attention_torch, inputs, geometry, weights)
    fused, fused_grads = outputs_and_grads(blossom_attention_triton, inputs, geometry, weights)
    assert len(fused) == len(reference) == (3 if compressed else 2)
    for got, want in zip(fused, reference):
        assert relative_error(got, want) < TOLERANCE
    for name, got, want in zip("q k v ck cv".split(), fused_grads, reference_grads):
        if want is None:
            assert got is None, name
        else:
            assert relative_error(got, want) < TOLERANCE, name
    width = geometry.num_selected_blocks
    chosen = select_blocks_triton(q.detach(), ck.detach(), geometry)
    assert torch.equal(as_sets(chosen, width), as_sets(select_blocks(q.detach(), ck.detach(), geometry), width))


def test_selection_ties_go_to_the_earlier_block():
    """Zero compressed keys make every visible block equally likely: both pick the earliest blocks."""
    q = torch.randn(1, 2, 120, 16)
    ck = torch.zeros(1, 1, DEFAULT.num_compressed_blocks(120), 16)
    ck[..., 3, :] = 1.0
    chosen = select_blocks_triton(q, ck, DEFAULT)
    want = select_blocks(q, ck, DEFAULT)
    assert torch.equal(as_sets(chosen, 4), as_sets(want, 4))
    assert chosen[0, 0, 100].sort().values.tolist() == want[0, 0, 100].sort().values.tolist()


@pytest.mark.parametrize("tile", [16, 32])
def test_selection_merges_candidates_across_key_tiles(monkeypatch, tile):
    """Small key tiles make the running top-n merge many tiles, with exact ties spanning tiles and distinct scores.

    The ties must be exact in floating point, not only in exact arithmetic: the interpreter's dot is numpy's matmul,
    whose rounding of one output element depends on its place in the tile for some BLAS kernels (OpenBLAS's Haswell
    and Zen kernels do this, its SkylakeX kernel does not), so equal query-key products of random floats can differ
    in the last bit and the test would check rounding, not the tie rule. Queries on a grid of eighths make every
    product and partial sum exact, so tied blocks score bitwise equal whatever the summation order.
    """
    monkeypatch.setitem(triton_backend.TUNING, "forward_keys", tile)
    length = 300
    generator = torch.Generator().manual_seed(tile)
    q = torch.randint(-16, 17, (2, 4, length, 16), generator=generator) / 8.0
    width = DEFAULT.num_compressed_blocks(length)
    ck = torch.randn(2, 2, width, 16, generator=generator)
    ck[0] = 0.0  # batch 0: every visible block ties
    ck[0, :, ::5] = 0.5  # ... except every fifth, which ties among themselves at a higher score
    chosen = select_blocks_triton(q, ck, DEFAULT)
    want = select_blocks(q, ck, DEFAULT)
    assert torch.equal(as_sets(chosen, 4), as_sets(want, 4))


@pytest.mark.parametrize("num_branches", [2, 3])
@pytest.mark.parametrize("token_major", [False, True])
def test_fused_gated_sum_matches_the_plain_sum(num_branches, token_major):
    """Batched ([B, L, H, n] logits, [B, H, L, D] branches) or token-major ([T, H, n], [T, H, D]) as the model's."""
    batch, heads, length, dim = (1, 4, 29, 24) if token_major else (2, 4, 13, 24)
    projection = torch.randn(batch, length, 7 + heads * num_branches, requires_grad=True)
    gates = projection[..., 7:].view(batch, length, heads, num_branches)  # strided, like the model's
    branches = [torch.randn(batch, length, heads, dim).transpose(1, 2).requires_grad_() for _ in range(num_branches)]
    weights = torch.randn(batch, heads, length, dim)
    if token_major:
        gates, weights = gates[0], weights[0].transpose(0, 1)
        branches = [torch.randn(length, heads, dim).requires_grad_() for _ in range(num_branches)]
    fused = gated_sum(gates, branches)
    plain = gated_sum(gates, branches, fused=False)
    torch.testing.assert_close(fused, plain)
    for got, want in zip(torch.autograd.grad((fused * weights).sum(), [projection, *branches]),
                         torch.autograd.grad((plain * weights).sum(), [projection, *branches])):
        torch.testing.assert_close(got, want)


def test_unsupported_geometry_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(triton_backend, "_warned", set())
    small = SparseGeometry(compress_block_size=8, compress_stride=4, selection_block_size=4,
                           num_selected_blocks=2, stis_window=3)
    inputs = random_inputs(1, 2, 1, 20, 8, True, small, seed=5)
    with pytest.warns(UserWarning, match="falls back to the PyTorch path"):
        fused = blossom_attention_triton(*inputs, small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blossom_attention_triton(*inputs, small)
    for got, want in zip(fused, blossom_attention_torch(*inputs, small)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_model_loss_and_gradients_match_the_torch_backend(padding):
    config = BlossomRecConfig(n_items=30, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64, hidden_dropout_prob=0.0)
    ids = torch.randint(1, 31, (2, 40), generator=torch.Generator().manual_seed(0))
    ids[1, :13] = 0
    if padding == "right":
        ids[1] = torch.cat([ids[1, 13:], ids[1, :13]])
    results = {}
    for implementation in ("blossom_torch", "blossom_triton"):
        torch.manual_seed(0)
        model = BlossomRecForSequentialRecommendation(config).train()
        model.set_attn_implementation(implementation)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[implementation] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (loss_ref, grads_ref), (loss_fused, grads_fused) = results["blossom_torch"], results["blossom_triton"]
    assert relative_error(loss_fused, loss_ref) < TOLERANCE
    checked = [n for n in grads_ref if "compressor" in n or "_proj" in n]  # input_proj holds the gate logits
    assert any("compressor.hidden_weight" in n for n in checked) and any("input_proj" in n for n in checked)
    for name in checked:  # the compressed keys' output bias shifts every score alike: its gradient is ~0
        difference = (grads_fused[name] - grads_ref[name]).norm()
        assert difference <= TOLERANCE * grads_ref[name].norm() + 1e-9, name
