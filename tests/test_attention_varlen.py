"""Packed (variable-length) BlossomRec attention: the PyTorch reference against each history alone, and the Triton
kernels (Triton's interpreter on the CPU) against that reference.

Length mixes hold a history of length 1, one of an exact multiple of the block size (16) and histories that start
at a token row on a block boundary, so that no result can lean on a history being aligned or padded in memory.
"""

import pytest
import torch

from blossomrec_hf.model.blossom_attention_torch import (
    blossom_attention_torch,
    blossom_attention_torch_varlen,
    select_blocks,
)
from blossomrec_hf.model.blossom_attention_triton import blossom_attention_triton_varlen, select_blocks_triton_varlen
from blossomrec_hf.model.sparse_patterns import SparseGeometry
from triton_support import requires_triton

GEOMETRY = SparseGeometry(compress_block_size=32, compress_stride=16, selection_block_size=16,
                          num_selected_blocks=2, stis_window=8)
HEADS, KV_HEADS, DIM = 4, 2, 16
# starts 0, 1, 38, 64, 128, 198: 64 and 128 are block boundaries; 64 is a whole number of blocks
MIXED = [1, 37, 26, 64, 70, 9]
TOLERANCE = 1e-3


def bounds(lengths):
    """cu_seqlens, cu_compressed (int32) and max_length of histories of these lengths."""
    counts = [GEOMETRY.num_compressed_blocks(n) for n in lengths]
    cumulative = [torch.tensor([0] + x).cumsum(0).to(torch.int32) for x in (lengths, counts)]
    return dict(cu_seqlens=cumulative[0], cu_compressed=cumulative[1], max_length=max(max(lengths), 1))


def packed_inputs(lengths, compressed, dtype, seed):
    """Leaf tensors: q, k, v as strided views of one [T, (H + 2 Hkv) * D] projection (as the model passes them),
    ck and cv [Wt, Hkv, D]; and the history bounds."""
    generator = torch.Generator().manual_seed(seed)
    sizes = bounds(lengths)
    tokens, width = int(sizes["cu_seqlens"][-1]), int(sizes["cu_compressed"][-1])
    projection = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * DIM, generator=generator, dtype=dtype)
    ck = torch.randn(width, KV_HEADS, DIM, generator=generator, dtype=dtype)
    cv = torch.randn(width, KV_HEADS, DIM, generator=generator, dtype=dtype) if compressed else None
    leaves = [t.requires_grad_() for t in (projection, ck, cv) if t is not None]
    return leaves, sizes


def split(projection):
    q, k, v = projection.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], dim=1)
    return q.view(-1, HEADS, DIM), k.view(-1, KV_HEADS, DIM), v.view(-1, KV_HEADS, DIM)


def run(attention, leaves, sizes, weights):
    """Outputs of `attention` on the leaves and the gradients of sum(weights * outputs): dq, dk, dv (the
    projection's, split), dck (None without cv: selection is not differentiable), dcv."""
    projection, ck, cv = (leaves + [None])[:3]
    outputs = [o for o in attention(*split(projection), ck, cv, **sizes, geometry=GEOMETRY) if o is not None]
    grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, outputs)), leaves, allow_unused=True)
    return outputs, [*split(grads[0]), *grads[1:]]


def assert_near(got, want, name):
    """Relative error within TOLERANCE, with a little absolute slack for gradients that are zero in exact arithmetic
    (a query that sees one compressed block only gives it dck = 0: rounding noise in the kernel)."""
    if want is None:
        assert got is None, name
        return
    assert got.shape == want.shape, name
    assert (got - want).norm() <= TOLERANCE * want.norm() + 1e-6, name


def assert_kernels_match_the_reference(leaves, sizes, weights):
    """The Triton kernels' outputs and gradients against the PyTorch varlen reference's, by name."""
    reference, reference_grads = run(blossom_attention_torch_varlen, leaves, sizes, weights)
    fused, fused_grads = run(blossom_attention_triton_varlen, leaves, sizes, weights)
    assert len(fused) == len(reference)
    names = ["selected", "stis", "compressed"][:len(fused)] + ["dq", "dk", "dv", "dck", "dcv"]
    for name, got, want in zip(names, fused + fused_grads, reference + reference_grads):
        assert_near(got, want, name)
    return fused


def weights_for(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(sum(lengths), HEADS, DIM, generator=generator, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("lengths", [MIXED, [16, 5, 11, 32, 1]])
def test_torch_varlen_equals_each_history_alone(lengths, compressed):
    leaves, sizes = packed_inputs(lengths, compressed, torch.float64, seed=len(lengths))
    weights = weights_for(lengths, seed=1)
    packed, packed_grads = run(blossom_attention_torch_varlen, leaves, sizes, weights)

    def alone(q, k, v, ck, cv, *, cu_seqlens, cu_compressed, max_length, geometry):
        """Each history on its own as a [1, H, L, D] batch, outputs packed back into token order."""
        parts = []
        for s in range(len(lengths)):
            rows, blocks = slice(*cu_seqlens[s:s + 2].tolist()), slice(*cu_compressed[s:s + 2].tolist())
            one = [None if x is None else x[r].transpose(0, 1)[None]
                   for x, r in zip((q, k, v, ck, cv), (rows, rows, rows, blocks, blocks))]
            parts.append(blossom_attention_torch(*one, geometry))
        return [None if parts[0][i] is None else torch.cat([p[i][0].transpose(0, 1) for p in parts])
                for i in range(3)]

    single, single_grads = run(alone, leaves, sizes, weights)
    assert len(packed) == (3 if compressed else 2)
    for got, want in zip(packed + packed_grads, single + single_grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@requires_triton
@pytest.mark.parametrize("lengths, compressed, index_dtype", [
    (MIXED, True, torch.int32),
    (MIXED, False, torch.int64),
    ([32, 3, 13, 50], True, torch.int64),  # 32 and 48 start on block boundaries
])
def test_triton_varlen_matches_the_torch_varlen_reference(lengths, compressed, index_dtype, kernel_path):
    leaves, sizes = packed_inputs(lengths, compressed, torch.float32, seed=7)
    sizes.update((name, sizes[name].to(index_dtype)) for name in ("cu_seqlens", "cu_compressed"))
    weights = [w.float() for w in weights_for(lengths, seed=2)]
    fused = assert_kernels_match_the_reference(leaves, sizes, weights)
    assert len(fused) == (3 if compressed else 2)


@requires_triton
def test_kernel_selection_is_each_history_own():
    """The kernel's block indices count from each history's first token, exactly as the reference's do."""
    leaves, sizes = packed_inputs(MIXED, False, torch.float32, seed=3)
    q = split(leaves[0].detach())[0]
    ck = leaves[1].detach()
    chosen = select_blocks_triton_varlen(q, ck, **sizes, geometry=GEOMETRY)
    cu, cc = sizes["cu_seqlens"].tolist(), sizes["cu_compressed"].tolist()
    for s in range(len(MIXED)):
        want = select_blocks(q[cu[s]:cu[s + 1]].transpose(0, 1)[None], ck[cc[s]:cc[s + 1]].transpose(0, 1)[None],
                             GEOMETRY)[0].transpose(0, 1)
        got = chosen[cu[s]:cu[s + 1], :, :want.shape[-1]]
        assert torch.equal(got.sort(-1).values, want.int().sort(-1).values), s
        assert (chosen[cu[s]:cu[s + 1], :, want.shape[-1]:] == -1).all(), s


@requires_triton
def test_histories_do_not_leak_into_each_other(kernel_path):
    """Changing one history's queries, keys and values leaves every other history's outputs and gradients bitwise
    unchanged."""
    leaves, sizes = packed_inputs(MIXED, True, torch.float32, seed=4)
    weights = [w.float() for w in weights_for(MIXED, seed=5)]
    before, before_grads = run(blossom_attention_triton_varlen, leaves, sizes, weights)
    changed = 3
    rows = slice(*sizes["cu_seqlens"][changed:changed + 2].tolist())
    with torch.no_grad():
        leaves[0][rows] = torch.randn(leaves[0][rows].shape, generator=torch.Generator().manual_seed(6))
    after, after_grads = run(blossom_attention_triton_varlen, leaves, sizes, weights)
    others = torch.ones(sum(MIXED), dtype=torch.bool)
    others[rows] = False
    for a, b in zip(before + before_grads[:3], after + after_grads[:3]):
        assert torch.equal(a[others], b[others])
        assert not torch.equal(a[rows], b[rows])
    blocks = slice(*sizes["cu_compressed"][changed:changed + 2].tolist())
    for a, b in zip(before_grads[3:], after_grads[3:]):  # dck, dcv of the other histories
        assert torch.equal(torch.cat([a[:blocks.start], a[blocks.stop:]]), torch.cat([b[:blocks.start], b[blocks.stop:]]))


@requires_triton
@pytest.mark.parametrize("lengths", [[20, 0, 33], [0, 40, 0, 0, 5, 0]])
def test_empty_histories(lengths, kernel_path):
    leaves, sizes = packed_inputs(lengths, True, torch.float32, seed=8)
    weights = [w.float() for w in weights_for(lengths, seed=9)]
    assert_kernels_match_the_reference(leaves, sizes, weights)


@requires_triton
def test_gradients_are_bitwise_reproducible(kernel_path):
    """No atomics anywhere: the backward also runs under torch's deterministic mode, bit for bit twice."""
    leaves, sizes = packed_inputs(MIXED, True, torch.float32, seed=10)
    weights = [w.float() for w in weights_for(MIXED, seed=11)]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run(blossom_attention_triton_varlen, leaves, sizes, weights)[1]
        second = run(blossom_attention_triton_varlen, leaves, sizes, weights)[1]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_short_batches_take_the_one_pass_kernels(monkeypatch):
    """The one-pass kernels serve batches of at most `one_pass_max_blocks` selection blocks, and never more than the
    64 an int64 of selection bits holds."""
    from blossomrec_hf.model import blossom_attention_triton as backend
    q, k = torch.zeros(1, 8, 16), torch.zeros(1, 2, 16)
    limit = backend.TUNING["one_pass_max_blocks"] * GEOMETRY.selection_block_size
    assert backend.uses_one_pass(limit, GEOMETRY, q, k)
    assert not backend.uses_one_pass(limit + 1, GEOMETRY, q, k)
    monkeypatch.setitem(backend.TUNING, "one_pass_max_blocks", 1000)
    assert backend.uses_one_pass(64 * GEOMETRY.selection_block_size, GEOMETRY, q, k)
    assert not backend.uses_one_pass(64 * GEOMETRY.selection_block_size + 1, GEOMETRY, q, k)


def test_query_blocks_too_wide_for_the_one_pass_kernels_take_the_gathered_ones():
    """A selection block of every head of a kv group, at the padded head width, must fit the one-pass kernels' shared
    memory: float32 up to 4,096 elements, 16-bit up to 8,192 (measured for sm_90)."""
    from blossomrec_hf.model import blossom_attention_triton as backend
    short = GEOMETRY.selection_block_size
    for kv_heads, dim, dtype, expected in [(4, 128, torch.float32, True), (2, 128, torch.float32, False),
                                           (1, 32, torch.float32, True), (1, 64, torch.float32, False),
                                           (2, 128, torch.bfloat16, True), (1, 128, torch.bfloat16, False),
                                           (1, 100, torch.float32, False)]:
        q, k = torch.zeros(1, 8, dim, dtype=dtype), torch.zeros(1, kv_heads, dim, dtype=dtype)
        assert backend.uses_one_pass(short, GEOMETRY, q, k) == expected, (kv_heads, dim, dtype)


@requires_triton
@pytest.mark.parametrize("keys_per_tile, dkdv_blocks", [(16, 1), (64, 1), (32, 2), (32, 4)])
def test_one_pass_key_tiles_of_other_sizes(monkeypatch, keys_per_tile, dkdv_blocks):
    """Score tiles narrower than, and spanning several, selection blocks give the reference's results; so do dk/dv
    programs of several key blocks (whose first query block is their first key block's)."""
    from blossomrec_hf.model import blossom_attention_triton as backend
    monkeypatch.setitem(backend.TUNING, "one_pass_keys", keys_per_tile)
    monkeypatch.setitem(backend.TUNING, "one_pass_dkdv_blocks", dkdv_blocks)
    leaves, sizes = packed_inputs([32, 3, 13, 50], True, torch.float32, seed=12)
    weights = [w.float() for w in weights_for([32, 3, 13, 50], seed=13)]
    assert backend.uses_one_pass(sizes["max_length"], GEOMETRY, *split(leaves[0])[:2])
    assert_kernels_match_the_reference(leaves, sizes, weights)


@requires_triton
@pytest.mark.parametrize("segment, max_segments, expected", [(16, 8, 5), (40, 8, 2), (1, 3, 3)])
def test_compressed_gradients_summed_over_query_segments(monkeypatch, segment, max_segments, expected):
    """dck, dcv with each compressed key tile's queries split into segments (float32 parts summed after the kernel):
    segments of one selection block, segments that end inside a row tile, and segments lengthened so that there are
    at most `max_segments` (which bounds the parts' memory) give the reference's gradients."""
    from blossomrec_hf.model import blossom_attention_triton as backend
    monkeypatch.setitem(backend.TUNING, "compressed_dkdv_segment", segment)
    monkeypatch.setitem(backend.TUNING, "compressed_dkdv_max_segments", max_segments)
    kernel, grids = backend.compressed_backward_dkdv, []

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(backend, "compressed_backward_dkdv", Recorded())
    leaves, sizes = packed_inputs(MIXED, True, torch.float32, seed=18)
    assert_kernels_match_the_reference(leaves, sizes, [w.float() for w in weights_for(MIXED, seed=19)])
    assert [grid[2] for grid in grids] == [expected]  # max length 70


@requires_triton
def test_compressed_gradients_of_whole_key_tiles(monkeypatch):
    """Gradients with tiles of 16 compressed keys, where whole key tiles are visible to whole tiles of rows: dck, dcv
    (16 positions per row tile: rows 256-287 of the 300-long history) and dq (query blocks 16-18 see the first key
    tile whole, and skip its mask) give the reference's."""
    from blossomrec_hf.model import blossom_attention_triton as backend
    monkeypatch.setitem(backend.TUNING, "dkdv_keys", 16)
    monkeypatch.setitem(backend.TUNING, "dq_keys", 16)
    monkeypatch.setitem(backend.TUNING, "dkdv_rows", 16 * HEADS // KV_HEADS)
    leaves, sizes = packed_inputs([300, 37], True, torch.float32, seed=20)
    assert not backend.uses_one_pass(sizes["max_length"], GEOMETRY, *split(leaves[0])[:2])
    assert_kernels_match_the_reference(leaves, sizes, [w.float() for w in weights_for([300, 37], seed=21)])


@requires_triton
def test_the_backward_follows_the_path_its_forward_took(monkeypatch):
    """A forward on the one-pass kernels leaves no reverse index: its backward takes the one-pass kernels too, even if
    the limit changes in between (a tuning run, or a graph traced earlier)."""
    from blossomrec_hf.model import blossom_attention_triton as backend
    leaves, sizes = packed_inputs(MIXED, True, torch.float32, seed=14)
    weights = [w.float() for w in weights_for(MIXED, seed=15)]
    reference, reference_grads = run(blossom_attention_torch_varlen, leaves, sizes, weights)
    assert backend.uses_one_pass(sizes["max_length"], GEOMETRY, *split(leaves[0])[:2])
    outputs = blossom_attention_triton_varlen(*split(leaves[0]), *leaves[1:], **sizes, geometry=GEOMETRY)
    monkeypatch.setitem(backend.TUNING, "one_pass_max_blocks", 0)  # the gathered path, from now on
    grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, outputs)), leaves)
    for index, (got, want) in enumerate(zip([*split(grads[0]), *grads[1:]], reference_grads)):
        assert_near(got, want, index)


@requires_triton
def test_a_batch_past_the_int32_selection_index_is_refused_by_name():
    """The reverse index names a key block by the int32 group h * T + its first row: a batch with kv heads x tokens of
    2^31 or more is refused before anything is allocated, not indexed wrongly."""
    from types import SimpleNamespace

    from blossomrec_hf.model import blossom_attention_triton as backend
    plan = SimpleNamespace(tokens=2**30, kv_heads=2)
    with pytest.raises(ValueError, match="1,073,741,824 tokens x 2 kv heads is past its int32 selection index"):
        backend._compressed_forward(plan, q=None, ck=None, cv=None, sort_keys=True)


@requires_triton
def test_launches_refused_for_shared_memory_run_with_smaller_tiles(kernel_path, monkeypatch):
    """A GPU without the shared memory for the tuned tiles (Triton raises OutOfResources before a kernel runs): the
    launches retry with smaller tiles, and grids follow the tiles, so outputs and gradients still match the
    reference."""
    from triton.runtime.errors import OutOfResources

    from blossomrec_hf.model import blossom_attention_triton as backend
    from blossomrec_hf.model import tile_fitting

    smallest = {"BM": 16 // (HEADS // KV_HEADS), "BW": 16, "BK": 16, "BKK": 16}
    shrunk = set()

    def small_tiles_only(kernel):
        class StandIn:
            def __getitem__(self, grid):
                def launch(**arguments):
                    tiles = {name: arguments[name] for name in smallest if name in arguments}
                    if any(size > smallest[name] for name, size in tiles.items()):
                        raise OutOfResources(65536, 32768, "shared memory")
                    shrunk.add(kernel.__name__)
                    return kernel[grid](**arguments)
                return launch
        return StandIn()

    monkeypatch.setattr(tile_fitting, "_FITTED", {})
    monkeypatch.setitem(backend.TUNING, "one_pass_dkdv_blocks", 2)  # key tiles of 32, refused down to one block
    for name in ("compressed_forward", "one_pass_forward", "one_pass_backward_dq", "one_pass_backward_dkdv",
                 "backward_dq", "compressed_backward_dkdv"):
        monkeypatch.setattr(backend, name, small_tiles_only(getattr(backend, name)))
    leaves, sizes = packed_inputs(MIXED, True, torch.float32, seed=16)
    assert_kernels_match_the_reference(leaves, sizes, [w.float() for w in weights_for(MIXED, seed=17)])
    one_pass = ["one_pass_backward_dq", "one_pass_backward_dkdv"]
    backward = one_pass if kernel_path == "one_pass" else ["backward_dq"]
    assert {"compressed_forward", *backward, "compressed_backward_dkdv"} <= shrunk
