"""Triton kernels of the block compressor's gather and its adjoint; `block_compressor.py` launches them.

The compressor's MLPs read each compressed block as rows, one per kv head: the block's slots one after another, each
slot that head's D channels of one token. `unfold_blocks` writes those rows for keys and values in one pass, straight
from token-major k and v [T, HKV, D] (zeros in a slot before its history's first item). `fold_blocks` is its adjoint:
each token sums the gradients of the few slots that hold it, keys and values at once, in float32. In PyTorch each
direction is an index gather plus a stacked or permuted copy; on an H100 the two gathers alone took 0.32 ms of a
3.5 ms attention step at 131,072 tokens.
"""

import triton
import triton.language as tl


@triton.jit
def _row_offsets(blocks, slots, channels, HKV: tl.constexpr, D: tl.constexpr, SLOTS: tl.constexpr):
    """Offsets into one unfolded tensor [W * HKV, SLOTS * D] of (block, slot, channel = head * D + d)."""
    head, d = channels // D, channels % D
    return ((blocks * HKV + head) * SLOTS + slots) * D + d


@triton.jit(do_not_specialize=["n_blocks"])
def unfold_blocks(K, V, SLOT_TOKENS, COVERED, OUT, n_blocks, HKV: tl.constexpr, D: tl.constexpr,
                  SLOTS: tl.constexpr, BLOCK_SLOTS: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    """K, V [T, HKV, D], SLOT_TOKENS and COVERED [n_blocks, SLOTS] -> OUT [2, n_blocks * HKV, SLOTS * D]."""
    blocks = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    slots = tl.arange(0, BLOCK_SLOTS)
    channels = tl.arange(0, BLOCK_C)
    slot_index = blocks[:, None] * SLOTS + slots[None, :]
    in_range = (blocks < n_blocks)[:, None] & (slots < SLOTS)[None, :]
    tokens = tl.load(SLOT_TOKENS + slot_index, mask=in_range, other=0).to(tl.int64)
    covered = tl.load(COVERED + slot_index, mask=in_range, other=0) != 0
    store = in_range[:, :, None] & (channels < HKV * D)[None, None, :]
    load = store & covered[:, :, None]
    source = tokens[:, :, None] * (HKV * D) + channels[None, None, :]
    target = _row_offsets(blocks[:, None, None], slots[None, :, None], channels[None, None, :], HKV, D, SLOTS)
    half = n_blocks.to(tl.int64) * (HKV * SLOTS * D)
    tl.store(OUT + target, tl.load(K + source, mask=load, other=0.0), mask=store)
    tl.store(OUT + half + target, tl.load(V + source, mask=load, other=0.0), mask=store)


@triton.jit(do_not_specialize=["n_tokens", "n_slots"])
def fold_blocks(GRAD, TOKEN_SLOT_ROWS, DK, DV, n_tokens, n_slots, HKV: tl.constexpr, D: tl.constexpr,
                SLOTS: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    """GRAD [2, W * HKV, SLOTS * D], TOKEN_SLOT_ROWS [n_tokens, PER_TOKEN] (flat slots block * SLOTS + slot holding
    each token; n_slots = W * SLOTS where none) -> DK, DV [n_tokens, HKV, D]."""
    tokens = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    channels = tl.arange(0, BLOCK_C)
    in_range = (tokens < n_tokens)[:, None] & (channels < HKV * D)[None, :]
    half = n_slots.to(tl.int64) * (HKV * D)
    dk = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    dv = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for p in tl.static_range(PER_TOKEN):
        slot = tl.load(TOKEN_SLOT_ROWS + tokens * PER_TOKEN + p, mask=tokens < n_tokens, other=n_slots).to(tl.int64)
        held = in_range & (slot < n_slots)[:, None]
        source = _row_offsets((slot // SLOTS)[:, None], (slot % SLOTS)[:, None], channels[None, :], HKV, D, SLOTS)
        dk += tl.load(GRAD + source, mask=held, other=0.0).to(tl.float32)
        dv += tl.load(GRAD + half + source, mask=held, other=0.0).to(tl.float32)
    target = tokens[:, None] * (HKV * D) + channels[None, :]
    tl.store(DK + target, dk.to(DK.dtype.element_ty), mask=in_range)
    tl.store(DV + target, dv.to(DV.dtype.element_ty), mask=in_range)
