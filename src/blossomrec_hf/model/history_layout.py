"""Checking histories and laying out their items as one flat list of real tokens.

Callers give histories padded ([B, L], 0 = padding, on either side) or packed ([B, T] with `position_ids` restarting
at 0 at each history's first item, as `transformers.DataCollatorWithFlattening` makes them). Either way the model
computes on the real items only, history after history (`HistoryLayout`): embeddings, projections, attention,
feed-forward layers and the loss never touch padding. Attention reads the histories where they lie, bounded by
`cu_seqlens` (the varlen convention of flash attention); only the PyTorch fallbacks scatter them into a
[histories, longest history] buffer (`pad`, `unpad`). Positions, block boundaries and causality count from each
history's own first item, so no item ever sees padding or another history, and scores depend neither on the padding
side or amount nor on batch neighbours.
"""

from dataclasses import dataclass, field
from functools import cached_property

import torch


def check_item_ids(ids: torch.Tensor, n_items: int, name: str, allowed_extra: tuple[int, ...] = ()) -> None:
    """Raise a ValueError naming the first id outside [0, n_items] (and its row) instead of an indexing assert."""
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
    """The real items of a batch as one flat token list, history by history.

    token_index [T]: where each token sits in the caller's [B, L] input (flattened); positions [T]: its position in its
    history; history_of_token [T]; lengths [S] and cu_seqlens [S + 1] of the S histories; max_length: the longest
    (the width of the attention buffer). Padded input gives one history per row (S = B, empty rows included).
    """

    token_index: torch.Tensor
    positions: torch.Tensor
    history_of_token: torch.Tensor
    lengths: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int
    caller_shape: tuple[int, int]
    _compressed: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_inputs(cls, input_ids, attention_mask, n_items: int, position_ids=None) -> "HistoryLayout":
        check_ids_tensor(input_ids, "input_ids")
        check_item_ids(input_ids, n_items, "input_ids")
        real = _real_items(input_ids, attention_mask)
        if position_ids is None:
            return cls._from_padded(real)
        return cls._from_packed(real, _checked_position_ids(position_ids, input_ids.shape))

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

    @property
    def num_histories(self) -> int:
        return self.lengths.shape[0]

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Caller layout [B, L, ...] -> tokens [T, ...]."""
        return x.flatten(0, 1)[self.token_index]

    def to_caller(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [T, ...] -> caller layout [B, L, ...]; padding positions are zeros."""
        out = tokens.new_zeros(self.caller_shape[0] * self.caller_shape[1], *tokens.shape[1:])
        return out.index_put((self.token_index,), tokens).view(*self.caller_shape, *tokens.shape[1:])

    def pad(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [T, ...] -> [S, max_length, ...], each history from column 0, zeros after its end."""
        out = tokens.new_zeros(self.num_histories * self.max_length, *tokens.shape[1:])
        out = out.index_put((self._buffer_index,), tokens)
        return out.view(self.num_histories, self.max_length, *tokens.shape[1:])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[S, max_length, ...] -> tokens [T, ...]."""
        return padded.flatten(0, 1)[self._buffer_index]

    @cached_property
    def _buffer_index(self) -> torch.Tensor:
        """Each token's place in the attention buffer, computed once per batch (every layer pads and unpads)."""
        return self.history_of_token * self.max_length + self.positions

    def compressed_blocks(self, block_size: int, stride: int) -> "CompressedBlocks":
        """Every history's compressed blocks, computed once per batch and block geometry (every layer needs them)."""
        key = (block_size, stride)
        if key not in self._compressed:
            self._compressed[key] = CompressedBlocks.of(self, block_size, stride)
        return self._compressed[key]

    def next_targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each token, the label of the next item of its history ([T]) and whether that is a target (a next item
        exists in the same history and its label is an item id, not 0 or -100)."""
        token_labels = self.tokens(labels)
        following = torch.cat([token_labels[1:], token_labels[:1].new_zeros(min(1, len(token_labels)))])
        has_next = self.positions < self.lengths[self.history_of_token] - 1
        return following, has_next & (following > 0)

    def last_tokens(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices of each history's last `count` items ([S, count]) and which of them exist."""
        index = self.cu_seqlens[1:, None] - count + torch.arange(count, device=self.lengths.device)[None, :]
        present = index >= self.cu_seqlens[:-1, None]
        return index.clamp(min=0), present


@dataclass
class CompressedBlocks:
    """The compressed blocks of a batch, history by history, as the attention kernels read them.

    Block w of a history covers its positions (w + 1) * stride - block_size .. (w + 1) * stride - 1 and exists while it
    ends before the history's last item (`SparseGeometry.num_compressed_blocks`). cu_seqlens [S + 1]: history s's blocks
    are rows cu_seqlens[s] .. cu_seqlens[s + 1] - 1; token_rows [W, block_size]: the token each block slot covers, -1
    for positions before the history's first item (zero keys, as published).
    """

    cu_seqlens: torch.Tensor
    token_rows: torch.Tensor

    @classmethod
    def of(cls, layout: HistoryLayout, block_size: int, stride: int) -> "CompressedBlocks":
        counts = (layout.lengths - 1).clamp(min=0) // stride
        cu_seqlens = _cumulative(counts)
        total = int(cu_seqlens[-1])
        device = counts.device
        history = torch.repeat_interleave(torch.arange(len(counts), device=device), counts, output_size=total)
        block = torch.arange(total, device=device) - cu_seqlens[history]
        positions = (block + 1)[:, None] * stride - block_size + torch.arange(block_size, device=device)[None, :]
        token_rows = torch.where(positions >= 0, layout.cu_seqlens[history][:, None] + positions, -1)
        return cls(cu_seqlens=cu_seqlens, token_rows=token_rows)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T, ...] -> each block's tokens [W, block_size, ...], zeros before a history's first item."""
        rows = self.token_rows
        if tokens.shape[0] == 0:
            return tokens.new_zeros(*rows.shape, *tokens.shape[1:])
        blocks = tokens[rows.clamp(min=0)]
        return blocks * (rows >= 0).view(*rows.shape, *([1] * (tokens.dim() - 1))).to(blocks.dtype)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def _real_items(input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
    """bool [B, L]: which positions hold an item (not padding), checked against the attention mask if given."""
    if attention_mask is None:
        return input_ids != 0
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                         f"{tuple(input_ids.shape)}")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (item)")
    real = attention_mask.bool()
    if bool((real & (input_ids == 0)).any()):
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
