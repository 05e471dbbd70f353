"""BlossomRec sparse attention in plain PyTorch: the exact reference (`attn_implementation="blossom_torch"`).

Every branch gathers the keys its queries may see and takes an exact softmax over them, so no L x L tensor is ever
built: work and memory grow as L * (keys per query). Queries are processed in chunks so that the per-chunk score
tensors stay small even at L = 16,384 on a CPU. Arithmetic is done in float32 (float64 for float64 inputs, so the
reference can check itself and the kernels in double precision); outputs come back in the input dtype.

Shapes: q [B, H, L, D]; k, v [B, H_kv, L, D]; compressed keys/values ck, cv [B, H_kv, W, D] with
W = geometry.num_compressed_blocks(L). H is a multiple of H_kv (grouped-query attention). Packed histories (the
varlen convention of flash attention) go through `blossom_attention_torch_varlen`, which lays each history out as a
row of that padded form.
"""

import math

import torch

from .history_layout import history_of_rows
from .sparse_patterns import SparseGeometry

QUERY_CHUNK = 1024


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `valid` entries; a row with no valid entry gives all zeros."""
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * valid


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, L, D], positions [B or 1, Hkv or 1, C, K] -> [B, Hkv, C, K, D]; out-of-range positions are clamped
    (callers mask them out)."""
    batch, heads, length, dim = x.shape
    positions = positions.clamp(0, length - 1).expand(batch, heads, *positions.shape[2:])
    flat = positions.reshape(batch, heads, -1, 1).expand(-1, -1, -1, dim)
    return x.gather(2, flat).view(*positions.shape, dim)


def attend_gathered(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Exact attention of each query over its own gathered keys.

    q [B, Hkv, G, C, D]; keys, values [B, Hkv, C, K, D]; valid [B or 1, Hkv or 1, C, K] -> [B, Hkv, G, C, D].
    """
    scores = torch.einsum("bhgcd,bhckd->bhgck", q, keys) / math.sqrt(q.shape[-1])
    probs = masked_softmax(scores, valid.unsqueeze(2))
    return torch.einsum("bhgck,bhckd->bhgcd", probs, values)


def compressed_probabilities(q: torch.Tensor, ck: torch.Tensor, query_positions: torch.Tensor,
                             geometry: SparseGeometry) -> torch.Tensor:
    """softmax_w(q_t . ck_w / sqrt(D)) over the compressed blocks that ended before t: [B, Hkv, G, C, W]."""
    scores = torch.einsum("bhgcd,bhwd->bhgcw", q, ck) / math.sqrt(q.shape[-1])
    ends = geometry.compressed_block_ends(ck.shape[2], device=q.device)
    valid = ends[None, :] < query_positions[:, None]
    return masked_softmax(scores, valid)


def selection_scores(probs: torch.Tensor, query_positions: torch.Tensor, seq_len: int,
                     geometry: SparseGeometry) -> torch.Tensor:
    """Importance of each selection block for each query, shared by the G heads of a kv head: [B, Hkv, C, J].

    A compressed block's probability (summed over the group's heads) counts for every selection block it overlaps.
    Blocks a query may not select (its own block and later ones) get -inf.
    """
    group_probs = probs.sum(dim=2)
    num_blocks = geometry.num_selection_blocks(seq_len)
    first, last = geometry.compressed_to_selection_span(group_probs.shape[-1], device=probs.device)
    scores = group_probs.new_zeros(*group_probs.shape[:-1], num_blocks)
    for step in range(geometry.max_selection_span):
        # blocks whose span ends before this step add exact zeros to a block in range: no data-dependent shape
        target = first + step
        in_span = target <= last
        scores.index_add_(-1, target.clamp(max=num_blocks - 1), group_probs * in_span)
    own_block = query_positions // geometry.selection_block_size
    selectable = torch.arange(num_blocks, device=probs.device)[None, :] < own_block[:, None]
    return scores.masked_fill(~selectable, float("-inf"))


def top_blocks(scores: torch.Tensor, num_selected: int) -> torch.Tensor:
    """Indices of the `num_selected` best blocks, best first, ties to the earlier block; -1 fills missing slots."""
    num_selected = min(num_selected, scores.shape[-1])
    best, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    best, order = best[..., :num_selected], order[..., :num_selected]
    return torch.where(torch.isinf(best), torch.full_like(order, -1), order)


def selected_keys(block_indices: torch.Tensor, query_positions: torch.Tensor, geometry: SparseGeometry):
    """Positions attended by the fine LTIS branch: the selected blocks, then the query's own block up to itself.

    block_indices [B, Hkv, C, n] -> positions [B, Hkv, C, (n + 1) * b] and their validity.
    """
    size = geometry.selection_block_size
    offsets = torch.arange(size, device=block_indices.device)
    own = (query_positions // size)[None, None, :, None].expand(*block_indices.shape[:3], 1)
    blocks = torch.cat([block_indices, own], dim=-1)
    positions = (blocks[..., None] * size + offsets).flatten(-2)
    valid = (blocks[..., None] >= 0).expand(*blocks.shape, size).flatten(-2)
    valid = valid & (positions <= query_positions[:, None])
    return positions, valid


def stis_keys(query_positions: torch.Tensor, seq_len: int, geometry: SparseGeometry):
    """Positions attended by STIS: t - delta for the window and power-of-two offsets ([1, 1, C, K]) and validity."""
    offsets = torch.tensor(geometry.stis_offsets(seq_len), device=query_positions.device)
    positions = query_positions[:, None] - offsets[None, :]
    return positions[None, None], (positions >= 0)[None, None]


def _compute(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    batch, heads, length, dim = q.shape
    return q.view(batch, kv_heads, heads // kv_heads, length, dim)


def select_blocks(q: torch.Tensor, ck: torch.Tensor, geometry: SparseGeometry) -> torch.Tensor:
    """LTIS block selection for every query: [B, Hkv, L, num_selected_blocks] block indices, -1 where none."""
    seq_len = q.shape[2]
    qg = _grouped(_compute(q), ck.shape[1])
    positions = torch.arange(seq_len, device=q.device)
    probs = compressed_probabilities(qg, _compute(ck), positions, geometry)
    return top_blocks(selection_scores(probs, positions, seq_len, geometry), geometry.num_selected_blocks)


def selected_attention(q, k, v, block_indices, geometry: SparseGeometry) -> torch.Tensor:
    """Fine LTIS branch given the selected blocks [B, Hkv, L, n]: [B, H, L, D]."""
    positions = torch.arange(q.shape[2], device=q.device)
    key_positions, valid = selected_keys(block_indices, positions, geometry)
    out = attend_gathered(_grouped(_compute(q), k.shape[1]), gather_positions(_compute(k), key_positions),
                          gather_positions(_compute(v), key_positions), valid)
    return out.flatten(1, 2).to(q.dtype)


def blossom_attention_torch(q, k, v, ck, cv, geometry: SparseGeometry, query_chunk: int = QUERY_CHUNK, *,
                            selected: bool = True, stis: bool = True):
    """All BlossomRec branches: (selected, stis, compressed) outputs, each [B, H, L, D]; compressed is None if cv is.

    Block selection is not differentiable (top-n indices); gradients reach ck through the compressed branch.
    Ablations leave branches out, and their output is None: `selected=False` skips the block selection and the fine
    LTIS branch (ck is then read only for the compressed branch, and may be None without cv), `stis=False` STIS.
    """
    batch, heads, seq_len, dim = q.shape
    kv_heads = k.shape[1]
    qg = _grouped(_compute(q), kv_heads)
    scores_blocks = selected or cv is not None
    keys, values = _compute(k), _compute(v)
    compressed_keys = _compute(ck) if scores_blocks else None
    compressed_values = _compute(cv) if cv is not None else None
    selected_parts, stis_parts, compressed = [], [], []
    for start in range(0, seq_len, query_chunk):
        positions = torch.arange(start, min(seq_len, start + query_chunk), device=q.device)
        q_chunk = qg[:, :, :, start:start + len(positions)]

        if scores_blocks:
            probs = compressed_probabilities(q_chunk, compressed_keys, positions, geometry)
        if compressed_values is not None:
            compressed.append(torch.einsum("bhgcw,bhwd->bhgcd", probs, compressed_values))
        if selected:
            with torch.no_grad():
                scores = selection_scores(probs, positions, seq_len, geometry)
                block_indices = top_blocks(scores, geometry.num_selected_blocks)
            key_positions, valid = selected_keys(block_indices, positions, geometry)
            selected_parts.append(attend_gathered(q_chunk, gather_positions(keys, key_positions),
                                                  gather_positions(values, key_positions), valid))
        if stis:
            key_positions, valid = stis_keys(positions, seq_len, geometry)
            stis_parts.append(attend_gathered(q_chunk, gather_positions(keys, key_positions),
                                              gather_positions(values, key_positions), valid))

    def merge(parts):
        return torch.cat(parts, dim=3).reshape(batch, heads, seq_len, dim).to(q.dtype)

    return (merge(selected_parts) if selected else None, merge(stis_parts) if stis else None,
            merge(compressed) if cv is not None else None)


def _varlen_buffer_index(cu_seqlens: torch.Tensor, num_rows: int, width: int) -> torch.Tensor:
    """Where each row of a packed tensor goes in a [S * width + 1] buffer: history * width + position (no host sync);
    rows past cu_seqlens[-1] (the unused rows of a static number of compressed blocks) go to the last, spare slot."""
    cu_seqlens = cu_seqlens.long()
    histories = cu_seqlens.shape[0] - 1
    rows = torch.arange(num_rows, device=cu_seqlens.device)
    history = history_of_rows(cu_seqlens, rows)
    inside = history < histories
    history = history.clamp(max=max(histories - 1, 0))
    return torch.where(inside, history * width + rows - cu_seqlens[history], histories * width)


def _pad_varlen(x: torch.Tensor, index: torch.Tensor, num_histories: int, width: int) -> torch.Tensor:
    """Packed rows [N, heads, D] -> [S, heads, width, D], each history from column 0, zeros after its end."""
    size = num_histories * width
    buffer = x.new_zeros(size + 1, *x.shape[1:]).index_put((index,), x)[:size]
    return buffer.view(num_histories, width, *x.shape[1:]).transpose(1, 2)


def _unpad_varlen(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[S, heads, width, D] -> packed rows [N, heads, D]."""
    return x.transpose(1, 2).flatten(0, 1)[index]


def blossom_attention_torch_varlen(q, k, v, ck, cv, *, cu_seqlens, cu_compressed, max_length, geometry,
                                   selected: bool = True, stis: bool = True):
    """All BlossomRec branches over packed histories: (selected, stis, compressed) outputs, each [T, H, D];
    compressed is None if cv is, and a branch left out (`selected`, `stis`: see `blossom_attention_torch`) is None.

    q [T, H, D] and k, v [T, Hkv, D] hold S histories back to back, history s in rows cu_seqlens[s] ..
    cu_seqlens[s + 1] - 1; its compressed keys/values are rows cu_compressed[s] .. cu_compressed[s + 1] - 1 of
    ck, cv [Wt, Hkv, D] (rows past cu_compressed[-1] are ignored). max_length >= the longest history. Each history
    becomes a row of a [S, max_length] buffer for `blossom_attention_torch`: exact, because positions count from a
    history's first token and no query sees a position after its own, so no real query sees the zeros after its
    history's end (or after its last compressed block); the padding rows' own outputs are dropped.
    """
    histories = cu_seqlens.shape[0] - 1
    width = geometry.num_compressed_blocks(max_length)
    tokens = _varlen_buffer_index(cu_seqlens, q.shape[0], max_length)
    if not selected and cv is None:  # no branch reads the compressed keys
        ck = None
    blocks = None if ck is None else _varlen_buffer_index(cu_compressed, ck.shape[0], width)
    rows = [_pad_varlen(x, tokens, histories, max_length) for x in (q, k, v)]
    compressed = [None if x is None else _pad_varlen(x, blocks, histories, width) for x in (ck, cv)]
    outputs = blossom_attention_torch(*rows, *compressed, geometry, selected=selected, stis=stis)
    return tuple(None if o is None else _unpad_varlen(o, tokens) for o in outputs)
