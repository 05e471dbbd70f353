"""Checking histories and laying out their items as one flat list of real tokens.

Callers give histories padded ([B, L], 0 = padding, on either side) or packed ([B, T] with `position_ids` restarting
at 0 at each history's first item, as `transformers.DataCollatorWithFlattening` makes them). Either way the model
computes on the real items only, history after history (`HistoryLayout`): embeddings, projections, attention,
feed-forward layers and the loss never touch padding. Attention reads the histories where they lie, bounded by
`cu_seqlens` (the varlen convention of flash attention); only the PyTorch fallbacks scatter them into a
[histories, longest history] buffer (`pad`, `unpad`). Positions, block boundaries and causality count from each
history's own first item, so no item ever sees padding or another history, and scores depend neither on the padding
side or amount nor on batch neighbours.

Static layouts (`torch.compile`): while compiling, the layout takes every position of the input as a token (padding
included, placed after its history's items), so that no shape depends on the data and nothing waits for the device.
Padded input [B, L] keeps one history of width L per row; packed input gives its histories either as `cu_seqlens`
with a host-side `max_length` (what a collator of fixed-size batches computes, the `cu_seq_lens_q` / `max_length_q`
of Transformers' flash-attention kwargs: one compiled graph for every batch) or only as `position_ids` (then up to T
histories of up to T items, the token count T being the only static bound). Padding tokens are computed but never
seen by an item: they follow their history's items, and the loss, the caller-layout output and the per-history rows
leave them out. Input checks that read the data run only in eager mode.
"""

from dataclasses import dataclass, field

import torch


def check_item_ids(ids: torch.Tensor, n_items: int, name: str, allowed_extra: tuple[int, ...] = ()) -> None:
    """Raise a ValueError naming the first id outside [0, n_items] (and its row) instead of an indexing assert.

    It reads the data, so it checks nothing while compiling (a compiled step never waits for the device)."""
    if torch.compiler.is_compiling():
        return
    bad = (ids < 0) | (ids > n_items)
    for value in allowed_extra:
        bad &= ids != value
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} holds item id {int(ids[row, col])} at row {row}, position {col}, outside the vocabulary: "
            f"ids must lie in [0, n_items={n_items}] (0 = padding)"
        )


ID_DTYPES = (torch.long, torch.int32)


def check_ids_tensor(ids, name: str) -> None:
    """A [batch, sequence_length] tensor of torch.long or torch.int32 ids with at least one row and one position.

    8- and 16-bit integers are refused rather than converted: they cannot hold most catalogues' ids, so a conversion
    upstream may already have wrapped them silently.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of item ids, got {type(ids).__name__}")
    if ids.dtype not in ID_DTYPES:
        too_narrow = "" if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool else \
            " (narrower or unsigned integers cannot hold most item ids and wrap silently)"
        raise TypeError(f"{name} must hold integer item ids (torch.long or torch.int32), got dtype "
                        f"{ids.dtype}{too_narrow}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, sequence_length], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}): pass at least one history of at least one "
                         f"position")


@dataclass
class HistoryLayout:
    """The tokens of a batch as one flat list, history by history.

    token_index [T]: where each token sits in the caller's [B, L] input (flattened); positions [T]: its position in its
    history; history_of_token [T]; lengths [S] and cu_seqlens [S + 1] of the S histories; max_length: a bound on the
    longest (the width of the attention buffer). Padded input gives one history per row (S = B, empty rows included).

    Dynamic layouts (eager) hold only the items; static layouts (compiling, or given `cu_seqlens`) hold every position
    and say which tokens are items (`items` [T]) and how many items each history has (`item_counts` [S]); each
    history's items come first. `uniform_length`: every history is this long (static padded input).
    """

    token_index: torch.Tensor
    positions: torch.Tensor
    history_of_token: torch.Tensor
    lengths: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int
    caller_shape: tuple[int, int]
    items: torch.Tensor | None = None
    item_counts: torch.Tensor | None = None
    uniform_length: int | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_inputs(cls, input_ids, attention_mask, n_items: int, position_ids=None, cu_seqlens=None,
                    max_length=None) -> "HistoryLayout":
        """The layout of padded input, or of packed input (`position_ids`, and optionally `cu_seqlens` [S + 1] with
        `max_length`, an int >= the longest history). Static while compiling or with `cu_seqlens`, else dynamic."""
        check_ids_tensor(input_ids, "input_ids")
        checking = not torch.compiler.is_compiling()
        check_item_ids(input_ids, n_items, "input_ids")
        real = _real_items(input_ids, attention_mask, check=checking)
        if position_ids is not None:
            position_ids = _checked_position_ids(position_ids, input_ids.shape)
        if cu_seqlens is not None:
            return cls._from_boundaries(real, cu_seqlens, max_length, position_ids, check=checking)
        if max_length is not None:
            raise ValueError("max_length_q is given without cu_seq_lens_q: pass both (the histories' boundaries and "
                             "a bound on their length) or neither")
        if not checking:
            return cls._static_padded(real) if position_ids is None else cls._static_packed(real, position_ids)
        if position_ids is None:
            return cls._from_padded(real)
        return cls._from_packed(real, position_ids)

    @classmethod
    def _from_padded(cls, real: torch.Tensor) -> "HistoryLayout":
        batch, length = real.shape
        order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)  # each row's items first, in order
        lengths = real.sum(dim=1)
        kept = (torch.arange(length, device=real.device)[None, :] < lengths[:, None]).flatten().nonzero().flatten()
        rows, positions = kept // length, kept % length
        longest = int(lengths.max())  # the attention buffer's width: the longest history, not the padded width
        return cls(token_index=rows * length + order.flatten()[kept], positions=positions, history_of_token=rows,
                   lengths=lengths, cu_seqlens=_cumulative(lengths), max_length=max(longest, 1),
                   caller_shape=(batch, length))

    @classmethod
    def _from_packed(cls, real: torch.Tensor, position_ids: torch.Tensor) -> "HistoryLayout":
        flat_real, flat_positions = real.flatten(), position_ids.flatten()
        starts = flat_real & (flat_positions == 0)
        previous_real = torch.cat([flat_real.new_zeros(1), flat_real[:-1]])
        previous_position = torch.cat([flat_positions.new_full((1,), -1), flat_positions[:-1]])
        row_start = torch.zeros_like(flat_real).view(real.shape)
        row_start[:, 0] = True
        continues = previous_real & (flat_positions == previous_position + 1) & ~row_start.flatten()
        broken = flat_real & ~starts & ~continues
        if bool(broken.any()):
            index = int(broken.nonzero()[0])
            row, col = divmod(index, real.shape[1])
            raise ValueError(
                f"position_ids at row {row}, position {col} is {int(flat_positions[index])}: in packed input each "
                f"history's position_ids count 0, 1, 2, ... from its first item (as DataCollatorWithFlattening makes "
                f"them), with no padding inside a history")
        token_index = flat_real.nonzero().flatten()
        history_of_token = torch.cumsum(starts[token_index].long(), 0) - 1
        num_histories = int(starts.sum())
        lengths = torch.bincount(history_of_token, minlength=num_histories)
        return cls(token_index=token_index, positions=flat_positions[token_index], history_of_token=history_of_token,
                   lengths=lengths, cu_seqlens=_cumulative(lengths),
                   max_length=max(int(lengths.max()) if num_histories else 0, 1), caller_shape=tuple(real.shape))

    @classmethod
    def _static_padded(cls, real: torch.Tensor) -> "HistoryLayout":
        """Every row one history of width L: its items first (in order), then its padding."""
        batch, length = real.shape
        device = real.device
        order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)
        rows = torch.arange(batch, device=device)
        return cls(token_index=(rows[:, None] * length + order).flatten(),
                   positions=torch.arange(length, device=device).repeat(batch),
                   history_of_token=rows.repeat_interleave(length), lengths=torch.full_like(rows, length),
                   cu_seqlens=torch.arange(batch + 1, device=device) * length, max_length=length,
                   caller_shape=(batch, length), items=real.gather(1, order).flatten(), item_counts=real.sum(dim=1),
                   uniform_length=length)

    @classmethod
    def _static_packed(cls, real: torch.Tensor, position_ids: torch.Tensor) -> "HistoryLayout":
        """Packed input known only by its position_ids: a history starts at each position 0 (and each row), so
        there are at most T of them, of at most T tokens; histories past the last one are empty."""
        flat_real = real.flatten()
        total = flat_real.shape[0]
        device = real.device
        index = torch.arange(total, device=device)
        starts = (position_ids.flatten() == 0) | (index % real.shape[1] == 0)
        history_of_token = torch.cumsum(starts.long(), 0) - 1
        lengths = torch.zeros(total, dtype=torch.long, device=device).index_add(0, history_of_token,
                                                                                 torch.ones_like(history_of_token))
        cu_seqlens = _cumulative(lengths)
        return cls(token_index=index, positions=index - cu_seqlens[history_of_token],
                   history_of_token=history_of_token, lengths=lengths, cu_seqlens=cu_seqlens, max_length=total,
                   caller_shape=tuple(real.shape), items=flat_real,
                   item_counts=torch.zeros_like(lengths).index_add(0, history_of_token, flat_real.long()))

    @classmethod
    def _from_boundaries(cls, real: torch.Tensor, cu_seqlens, max_length, position_ids, check: bool
                         ) -> "HistoryLayout":
        """Packed input with its histories' boundaries cu_seqlens [S + 1] (over the flattened input, ending at its
        size) and a bound `max_length` on their length, as a collator computes them on the host."""
        total = real.numel()
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or \
                cu_seqlens.dtype not in ID_DTYPES:
            raise ValueError(f"cu_seq_lens_q must be a 1-d torch.long or torch.int32 tensor of at least 2 boundaries, "
                             f"got {_describe(cu_seqlens)}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length_q must be a positive int (a bound on the histories' length, known on the "
                             f"host), got {max_length!r}")
        cu_seqlens = cu_seqlens.to(device=real.device, dtype=torch.long)
        flat_real = real.flatten()
        index = torch.arange(total, device=real.device)
        # clamped: the boundaries end at `total`, but a compiled graph cannot know it, and indexing per-history
        # tensors with an unclamped bucket trips inductor's device-side bounds assert on CUDA
        history_of_token = history_of_rows(cu_seqlens, index).clamp(max=cu_seqlens.shape[0] - 2)
        positions = index - cu_seqlens[history_of_token]
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if check:
            _check_boundaries(cu_seqlens, lengths, max_length, total, flat_real, positions, position_ids)
        else:  # a history longer than max_length would overrun the attention buffer; tokens past the boundaries
            # would be clamped into the last history
            torch._assert_async((lengths <= max_length).all(), "a history is longer than max_length_q")
            torch._assert_async(cu_seqlens[-1] == total, "cu_seq_lens_q does not end at the number of tokens")
        return cls(token_index=index, positions=positions, history_of_token=history_of_token, lengths=lengths,
                   cu_seqlens=cu_seqlens, max_length=max_length, caller_shape=tuple(real.shape), items=flat_real,
                   item_counts=torch.zeros_like(lengths).index_add(0, history_of_token, flat_real.long()))

    @property
    def num_histories(self) -> int:
        return self.lengths.shape[0]

    @property
    def is_static(self) -> bool:
        return self.items is not None

    def longest_history(self) -> int:
        """The most items of a history (eager only: a static layout counts them on the device)."""
        if self.item_counts is None:
            return self.max_length if self.num_histories else 0
        return int(self.item_counts.max()) if self.num_histories else 0

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Caller layout [B, L, ...] -> tokens [T, ...]."""
        return x.flatten(0, 1)[self.token_index]

    def to_caller(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [T, ...] -> caller layout [B, L, ...]; padding positions are zeros."""
        if self.items is not None:
            tokens = tokens.where(self.items.view(-1, *([1] * (tokens.dim() - 1))), 0)
        out = tokens.new_zeros(self.caller_shape[0] * self.caller_shape[1], *tokens.shape[1:])
        return out.index_put((self.token_index,), tokens).view(*self.caller_shape, *tokens.shape[1:])

    def pad(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [T, ...] -> [S, max_length, ...], each history from column 0, zeros after its end."""
        out = tokens.new_zeros(self.num_histories * self.max_length, *tokens.shape[1:])
        out = out.index_put((self._buffer_index(),), tokens)
        return out.view(self.num_histories, self.max_length, *tokens.shape[1:])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[S, max_length, ...] -> tokens [T, ...]."""
        return padded.flatten(0, 1)[self._buffer_index()]

    def _buffer_index(self) -> torch.Tensor:
        """Each token's place in the attention buffer, computed once per batch (every layer pads and unpads)."""
        if "buffer_index" not in self._cache:
            self._cache["buffer_index"] = self.history_of_token * self.max_length + self.positions
        return self._cache["buffer_index"]

    def compressed_blocks(self, block_size: int, stride: int) -> "CompressedBlocks":
        """Every history's compressed blocks, computed once per batch and block geometry (every layer needs them)."""
        key = ("compressed", block_size, stride)
        if key not in self._cache:
            self._cache[key] = CompressedBlocks.of(self, block_size, stride)
        return self._cache[key]

    def compressed_capacity(self, stride: int) -> int | None:
        """Static layouts: a bound on the batch's compressed blocks known without reading the data (exact when every
        history has the same length); None for dynamic layouts (they count them)."""
        if not self.is_static:
            return None
        if self.uniform_length is not None:
            return self.num_histories * (max(self.uniform_length - 1, 0) // stride)
        return self.token_index.shape[0] // stride  # sum of (length - 1) // stride <= T // stride

    def next_targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each token, the label of the next item of its history ([T]) and whether that is a target (a next item
        exists in the same history and its label is an item id, not 0 or -100)."""
        token_labels = self.tokens(labels)
        following = torch.cat([token_labels[1:], token_labels[:1].new_zeros(min(1, len(token_labels)))])
        has_next = self.positions < self.lengths[self.history_of_token] - 1
        if self.items is not None:  # static: the next token may be padding
            has_next = has_next & torch.cat([self.items[1:], self.items[:1].new_zeros(1)])
        return following, has_next & (following > 0)

    def last_tokens(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices of each history's last `count` items ([S, count]) and which of them exist."""
        ends = self.cu_seqlens[1:] if self.item_counts is None else self.cu_seqlens[:-1] + self.item_counts
        index = ends[:, None] - count + torch.arange(count, device=self.lengths.device)[None, :]
        present = index >= self.cu_seqlens[:-1, None]
        return index.clamp(min=0), present


@dataclass
class CompressedBlocks:
    """The compressed blocks of a batch, history by history, as the attention kernels read them.

    Block w of a history covers its positions (w + 1) * stride - block_size .. (w + 1) * stride - 1 and exists while it
    ends before the history's last item (`SparseGeometry.num_compressed_blocks`). cu_seqlens [S + 1]: history s's blocks
    are rows cu_seqlens[s] .. cu_seqlens[s + 1] - 1; token_rows [W, block_size]: the token each block slot covers, -1
    for positions before the history's first item (zero keys, as published). Static layouts give W rows from a bound
    known on the host (`HistoryLayout.compressed_capacity`): `valid` [W] then says which rows are blocks (rows past
    cu_seqlens[-1] are not, and cover no token); None when every row is. token_slots [T, ceil(block_size / stride)]:
    the inverse of token_rows, the flat slots (row * block_size + column) covering each token, -1 for none.
    The gather's own indices are derived once per batch (every layer gathers): `covered` [W, block_size], which slots
    hold a token; `slot_tokens`, token_rows with 0 where none; `token_slot_rows`, token_slots with one past the last
    slot where none (a zero row in the backward).
    """

    cu_seqlens: torch.Tensor
    token_rows: torch.Tensor
    token_slots: torch.Tensor
    valid: torch.Tensor | None = None
    covered: torch.Tensor = field(init=False, repr=False)
    slot_tokens: torch.Tensor = field(init=False, repr=False)
    token_slot_rows: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.covered = self.token_rows >= 0
        self.slot_tokens = self.token_rows.clamp(min=0)
        self.token_slot_rows = self.token_slots.where(self.token_slots >= 0, self.token_rows.numel())

    @classmethod
    def of(cls, layout: HistoryLayout, block_size: int, stride: int) -> "CompressedBlocks":
        counts = (layout.lengths - 1).clamp(min=0) // stride
        cu_seqlens = _cumulative(counts)
        capacity = layout.compressed_capacity(stride)
        total = int(cu_seqlens[-1]) if capacity is None else capacity
        device = counts.device
        rows = torch.arange(total, device=device)
        # each row's history (searchsorted rather than repeat_interleave: no host sync, and rows past the end are
        # allowed); those rows get the last history and no token
        history = history_of_rows(cu_seqlens, rows).clamp(max=len(counts) - 1)
        block = rows - cu_seqlens[history]
        positions = (block + 1)[:, None] * stride - block_size + torch.arange(block_size, device=device)[None, :]
        valid = None if capacity is None else rows < cu_seqlens[-1]
        covered = positions >= 0 if valid is None else (positions >= 0) & valid[:, None]
        token_rows = torch.where(covered, layout.cu_seqlens[history][:, None] + positions, -1)
        token_slots = _slots_of_tokens(token_rows, layout.positions.shape[0], -(-block_size // stride))
        return cls(cu_seqlens=cu_seqlens, token_rows=token_rows, token_slots=token_slots, valid=valid)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T, ...] -> each block's tokens [W, block_size, ...], zeros before a history's first item."""
        if tokens.shape[0] == 0:
            return tokens.new_zeros(*self.token_rows.shape, *tokens.shape[1:])
        return _GatherBlocks.apply(tokens, self.slot_tokens, self.covered, self.token_slot_rows)

    def only_valid(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Compressed keys or values [W, ...] with rows that are no block zeroed, and no gradient through them
        (whatever an attention backend writes there)."""
        if x is None or self.valid is None:
            return x
        return x.where(self.valid.view(-1, *([1] * (x.dim() - 1))), 0)


class _GatherBlocks(torch.autograd.Function):
    """The block gather, with a backward that gathers too: each token sums the few slots covering it (token_slots).
    Indexing's own backward scatter-adds instead, and every slot before a history's first item would add into token
    0: CUDA's index_put with accumulate walks such duplicates one by one (~21,000 of them in a batch of 655 histories
    of 200 items)."""

    @staticmethod
    def forward(ctx, tokens, slot_tokens, covered, token_slot_rows):
        ctx.save_for_backward(token_slot_rows)
        return gather_slots(tokens, slot_tokens, covered)

    @staticmethod
    def backward(ctx, grad_blocks):
        (token_slot_rows,) = ctx.saved_tensors
        return sum_slots(grad_blocks.flatten(0, 1), token_slot_rows), None, None, None


def gather_slots(tokens: torch.Tensor, slot_tokens: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """tokens [T, ...] -> the blocks' slots [W, block_size, ...] (`CompressedBlocks.slot_tokens`), zero where a slot
    covers no token."""
    return tokens[slot_tokens].where(covered.view(*covered.shape, *([1] * (tokens.dim() - 1))), 0)


def sum_slots(slots: torch.Tensor, token_slot_rows: torch.Tensor) -> torch.Tensor:
    """The gather's adjoint: flat slots [W * block_size, ...] -> [T, ...], each token the sum of the slots covering it
    (`CompressedBlocks.token_slot_rows`; an uncovered entry reads an appended zero row)."""
    slots = torch.cat([slots, slots.new_zeros(1, *slots.shape[1:])])
    return slots[token_slot_rows].sum(dim=1)


def _slots_of_tokens(token_rows: torch.Tensor, num_tokens: int, per_token: int) -> torch.Tensor:
    """[num_tokens, per_token]: the flat slots of token_rows holding each token, ascending, -1 where fewer. One stable
    sort and a binary search (no host sync); per_token = ceil(block_size / stride) bounds how many blocks cover a
    token."""
    flat = token_rows.flatten()
    keys, slots = torch.sort(torch.where(flat >= 0, flat, num_tokens), stable=True)  # uncovered slots sort last
    rank = torch.arange(flat.shape[0], device=flat.device) - torch.searchsorted(keys, keys)
    kept = (keys < num_tokens) & (rank < per_token)
    table = torch.full((num_tokens * per_token + 1,), -1, dtype=torch.long, device=flat.device)
    table[torch.where(kept, keys * per_token + rank, num_tokens * per_token)] = slots  # the last entry collects the rest
    return table[:-1].view(num_tokens, per_token)


def history_of_rows(cu_seqlens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """For each row index (>= 0), the history h whose rows [cu_seqlens[h], cu_seqlens[h + 1]) hold it; S (the number
    of histories) for rows at or past cu_seqlens[-1]. One binary search over all the boundaries, not over
    cu_seqlens[1:]: inductor failed to lower a search over that slice on CUDA (torch 2.11, "NotImplementedError:
    SliceView") where the boundaries are computed in the graph."""
    return torch.searchsorted(cu_seqlens, rows, right=True) - 1


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def _real_items(input_ids: torch.Tensor, attention_mask, check: bool = True) -> torch.Tensor:
    """bool [B, L]: which positions hold an item (not padding), checked against the attention mask if given (the
    checks that read the data only with `check`)."""
    if attention_mask is None:
        return input_ids != 0
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                         f"{tuple(input_ids.shape)}")
    if check and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (item)")
    real = attention_mask.bool()
    if check and bool((real & (input_ids == 0)).any()):
        row = int((real & (input_ids == 0)).nonzero()[0, 0])
        raise ValueError(f"attention_mask marks the padding id 0 as an item in row {row}")
    return real


def _checked_position_ids(position_ids, shape) -> torch.Tensor:
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in ID_DTYPES:
        raise TypeError(f"position_ids must be a torch.Tensor of integers (torch.long or torch.int32), got "
                        f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
    if tuple(position_ids.shape) != tuple(shape):
        raise ValueError(f"position_ids have shape {tuple(position_ids.shape)} but input_ids have shape {tuple(shape)}")
    return position_ids.long()


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _check_boundaries(cu_seqlens, lengths, max_length: int, total: int, items, positions, position_ids) -> None:
    """Eager checks of packed boundaries: they cover the input exactly, in order, within max_length; each history
    is its items, then padding (an all-padding history fills a fixed-size batch); position_ids agree."""
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((lengths < 0).any()):
        raise ValueError(f"cu_seq_lens_q must rise from 0 to the number of tokens ({total}), got "
                         f"{cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else 'other boundaries'}")
    longest = int(lengths.max())
    if longest > max_length:
        raise ValueError(f"max_length_q={max_length} but a history of cu_seq_lens_q has {longest} tokens")
    item_after_padding = items[1:] & ~items[:-1] & (positions[1:] > 0)
    if bool(item_after_padding.any()):
        index = int(item_after_padding.nonzero()[0]) + 1
        raise ValueError(f"the item at token {index} follows padding inside its history (cu_seq_lens_q): each "
                         f"history holds its items first, padding only after them")
    if position_ids is not None and not torch.equal(position_ids.flatten(), positions):
        index = int((position_ids.flatten() != positions).nonzero()[0])
        raise ValueError(f"position_ids at token {index} is {int(position_ids.flatten()[index])}, but cu_seq_lens_q "
                         f"puts it at position {int(positions[index])} of its history")
