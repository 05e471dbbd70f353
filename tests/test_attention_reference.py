"""The PyTorch BlossomRec attention against an independent brute-force float64 version.

The brute force builds each branch's explicit [L, L] (or [L, W]) mask straight from the definitions in SPEC.md,
section 2, loops over queries in Python where that is clearest, and takes a plain masked softmax.
"""

import math

import pytest
import torch

from blossomrec_hf.model.blossom_attention_torch import blossom_attention_torch, select_blocks, selected_attention
from blossomrec_hf.model.sparse_patterns import SparseGeometry

DEFAULT = SparseGeometry(compress_block_size=32, compress_stride=16, selection_block_size=16,
                         num_selected_blocks=4, stis_window=8)
SMALL = SparseGeometry(compress_block_size=8, compress_stride=4, selection_block_size=4,
                       num_selected_blocks=2, stis_window=3)
ODD = SparseGeometry(compress_block_size=6, compress_stride=3, selection_block_size=5,
                     num_selected_blocks=3, stis_window=2)


def brute_attention(q, keys, values, mask):
    """q [B, H, L, D], keys/values [B, H, K, D], mask [L, K] -> [B, H, L, D]; rows with nothing visible give 0."""
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ values


def stis_mask(length, geometry):
    offsets = set(range(geometry.stis_window)) | {2**i for i in range(20)}
    return torch.tensor([[0 <= t - j and (t - j) in offsets for j in range(length)] for t in range(length)],
                        dtype=torch.bool)


def compressed_mask(length, num_blocks, geometry):
    """Block w ends at (w + 1) * stride - 1 and is visible to queries after its end."""
    return torch.tensor([[(w + 1) * geometry.compress_stride - 1 < t for w in range(num_blocks)]
                         for t in range(length)], dtype=torch.bool)


def brute_selection(q, ck, geometry):
    """Per (b, kv head, t): the top-n past selection blocks by summed compressed probabilities."""
    batch, heads, length, _ = q.shape
    kv_heads, num_blocks = ck.shape[1], ck.shape[2]
    group = heads // kv_heads
    size, stride, block = geometry.selection_block_size, geometry.compress_stride, geometry.compress_block_size
    mask = compressed_mask(length, num_blocks, geometry)
    scores = torch.einsum("bhld,bhwd->bhlw", q, ck.repeat_interleave(group, 1)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    covers = [set(range(max(0, (w + 1) * stride - block), (w + 1) * stride)) for w in range(num_blocks)]
    selections = {}
    for b in range(batch):
        for h in range(kv_heads):
            for t in range(length):
                group_probs = probs[b, h * group:(h + 1) * group, t].sum(0)
                candidates = []
                for j in range(t // size):
                    positions = set(range(j * size, (j + 1) * size))
                    score = sum(float(group_probs[w]) for w in range(num_blocks) if covers[w] & positions)
                    candidates.append((-score, j))
                selections[b, h, t] = {j for _, j in sorted(candidates)[:geometry.num_selected_blocks]}
    return selections


def selected_mask(selections, b, h, length, geometry):
    size = geometry.selection_block_size
    return torch.tensor([[j <= t and (j // size in selections[b, h, t] or j // size == t // size)
                          for j in range(length)] for t in range(length)])


def brute_blossom(q, k, v, ck, cv, geometry):
    """All three branches, each [B, H, L, D], from explicit masks."""
    batch, heads, length, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    stis = brute_attention(q, k_full, v_full, stis_mask(length, geometry))
    compressed = None
    if cv is not None:
        mask = compressed_mask(length, ck.shape[2], geometry)
        compressed = brute_attention(q, ck.repeat_interleave(group, 1), cv.repeat_interleave(group, 1), mask)
    selections = brute_selection(q.detach(), ck.detach(), geometry)
    selected = torch.stack([
        torch.stack([
            brute_attention(q[b, h][None, None], k_full[b, h][None, None], v_full[b, h][None, None],
                            selected_mask(selections, b, h // group, length, geometry))[0, 0]
            for h in range(heads)])
        for b in range(batch)])
    return selected, stis, compressed, selections


def random_inputs(batch, heads, kv_heads, length, dim, geometry, with_values=True, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_blocks = geometry.num_compressed_blocks(length)

    def make(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    q = make(batch, heads, length, dim)
    k, v = make(batch, kv_heads, length, dim), make(batch, kv_heads, length, dim)
    ck = make(batch, kv_heads, num_blocks, dim)
    cv = make(batch, kv_heads, num_blocks, dim) if with_values else None
    return q, k, v, ck, cv


CASES = [
    # batch, heads, kv_heads, length, dim, geometry, compressed branch
    (2, 4, 2, 70, 8, DEFAULT, True),
    (1, 2, 1, 37, 4, SMALL, True),
    (2, 2, 2, 23, 4, ODD, True),
    (1, 4, 1, 29, 4, SMALL, False),
    (1, 2, 2, 1, 4, SMALL, True),
    (1, 2, 1, 5, 4, SMALL, True),
]


@pytest.mark.parametrize("batch, heads, kv_heads, length, dim, geometry, with_values", CASES)
def test_branches_match_brute_force_forward_and_backward(batch, heads, kv_heads, length, dim, geometry, with_values):
    inputs = random_inputs(batch, heads, kv_heads, length, dim, geometry, with_values)
    q, k, v, ck, cv = inputs
    got = blossom_attention_torch(q, k, v, ck, cv, geometry, query_chunk=16)
    *want, selections = brute_blossom(q, k, v, ck, cv, geometry)

    indices = select_blocks(q, ck, geometry)
    for (b, h, t), expected in selections.items():
        assert set(indices[b, h, t].tolist()) - {-1} == expected, (b, h, t)

    weights = [torch.randn_like(w) if w is not None else None for w in want]
    for name, g, w in zip(("selected", "stis", "compressed"), got, want):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=f"{name} branch forward")

    tensors = [t for t in inputs if t is not None]
    loss_got = sum((g * r).sum() for g, r in zip(got, weights) if g is not None)
    loss_want = sum((w * r).sum() for w, r in zip(want, weights) if w is not None)
    grads_got = torch.autograd.grad(loss_got, tensors, allow_unused=True)
    grads_want = torch.autograd.grad(loss_want, tensors, allow_unused=True)
    for name, g, w in zip("q k v ck cv".split(), grads_got, grads_want):
        if w is None:
            assert g is None or g.abs().max() == 0, name
            continue
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_selected_attention_with_given_blocks_matches_brute_force():
    geometry = SMALL
    q, k, v, ck, _ = random_inputs(1, 2, 1, 31, 4, geometry, with_values=False, seed=3)
    indices = select_blocks(q, ck, geometry)
    selections = {(0, 0, t): set(indices[0, 0, t].tolist()) - {-1} for t in range(31)}
    want = brute_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                           selected_mask(selections, 0, 0, 31, geometry))
    torch.testing.assert_close(selected_attention(q, k, v, indices, geometry), want, rtol=1e-9, atol=1e-9)


def test_query_chunking_does_not_change_results():
    q, k, v, ck, cv = random_inputs(1, 4, 2, 90, 8, DEFAULT, seed=5)
    whole = blossom_attention_torch(q, k, v, ck, cv, DEFAULT, query_chunk=1024)
    chunked = blossom_attention_torch(q, k, v, ck, cv, DEFAULT, query_chunk=7)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_are_accumulated_in_float32(dtype):
    q, k, v, ck, cv = random_inputs(2, 4, 2, 64, 16, DEFAULT, seed=7)
    reference = blossom_attention_torch(q, k, v, ck, cv, DEFAULT)
    low = blossom_attention_torch(*(t.detach().to(dtype) for t in (q, k, v, ck, cv)), DEFAULT)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for want, got in zip(reference, low):
        assert got.dtype == dtype
        error = (got.double() - want).norm() / want.norm()
        assert error < tolerance


def test_stis_offsets_are_window_plus_powers_of_two():
    assert DEFAULT.stis_offsets(100) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]
    assert DEFAULT.stis_offsets(3) == [0, 1, 2]
    assert SMALL.stis_offsets(20) == [0, 1, 2, 4, 8, 16]
