"""Which keys each BlossomRec branch lets a query see: the static geometry shared by every attention backend.

Positions count from each history's first item (the model left-aligns every history before attention), so the
geometry depends only on the sequence length, never on padding.

- Compressed blocks (LTIS scoring and the compressed branch): block `w` covers positions
  `[(w + 1) * stride - block_size, (w + 1) * stride - 1]` (positions below 0 are zero keys) and may be seen by query
  `t` only once it has ended, i.e. when `(w + 1) * stride <= t`.
- Selection blocks (LTIS fine attention): block `j` covers `[j * b, (j + 1) * b - 1]`. Query `t` lives in block
  `t // b`; it attends to its own block up to `t` and to `num_selected_blocks` earlier blocks.
- STIS offsets: query `t` attends to `t - delta` for every delta in `stis_offsets`.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseGeometry:
    compress_block_size: int
    compress_stride: int
    selection_block_size: int
    num_selected_blocks: int
    stis_window: int

    @classmethod
    def from_config(cls, config) -> "SparseGeometry":
        return cls(
            compress_block_size=config.compress_block_size,
            compress_stride=config.compress_stride,
            selection_block_size=config.selection_block_size,
            num_selected_blocks=config.num_selected_blocks,
            stis_window=config.stis_window,
        )

    # ----- compressed blocks -----
    @property
    def compress_left_padding(self) -> int:
        """Zero keys placed before position 0 so that block 0 ends at `stride - 1`."""
        return self.compress_block_size - self.compress_stride

    def num_compressed_blocks(self, seq_len: int) -> int:
        """Blocks that some query of a length-`seq_len` sequence can see (those ending before position L - 1)."""
        return max(seq_len - 1, 0) // self.compress_stride

    def compressed_block_ends(self, num_blocks: int, device=None) -> torch.Tensor:
        """Last position covered by each compressed block."""
        return (torch.arange(num_blocks, device=device) + 1) * self.compress_stride - 1

    def compressed_to_selection_span(self, num_blocks: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last selection block that each compressed block overlaps (its importance flows to all of them).

        Computed on the host, so that under torch.compile they are constants: inductor fails to simplify indices
        derived on the device from an arange by clamping and flooring (torch 2.13, "vr must not be None")."""
        ends = [(block + 1) * self.compress_stride - 1 for block in range(num_blocks)]
        first = [max(end + 1 - self.compress_block_size, 0) // self.selection_block_size for end in ends]
        last = [end // self.selection_block_size for end in ends]
        return (torch.tensor(first, dtype=torch.long, device=device),
                torch.tensor(last, dtype=torch.long, device=device))

    @property
    def max_selection_span(self) -> int:
        """The most selection blocks one compressed block can overlap."""
        return (self.compress_block_size - 1) // self.selection_block_size + 2

    # ----- selection blocks -----
    def num_selection_blocks(self, seq_len: int) -> int:
        return -(-seq_len // self.selection_block_size)

    # ----- STIS -----
    def stis_offsets(self, seq_len: int) -> list[int]:
        """Distances looked back by STIS: 0..window-1, then every power of two >= window, below `seq_len`."""
        offsets = list(range(min(self.stis_window, seq_len)))
        power = 1
        while power < seq_len:
            if power >= self.stis_window:
                offsets.append(power)
            power *= 2
        return offsets
