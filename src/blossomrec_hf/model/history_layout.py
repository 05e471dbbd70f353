"""Checking histories and moving them to the layout the model computes in.

Callers may pad on either side. The model left-aligns every history (its first item at position 0, padding after
its last item), so positions, block boundaries and causality count from the history's own first item, and no query
of a real item ever sees padding or a batch neighbour: scores do not depend on the padding side or amount.
"""

from dataclasses import dataclass

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
    """Where each caller position goes in the left-aligned layout.

    order[b, i] is the caller position of the i-th item of history b (its padding positions follow, in order).
    """

    order: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_inputs(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, n_items: int) -> "HistoryLayout":
        check_ids_tensor(input_ids, "input_ids")
        check_item_ids(input_ids, n_items, "input_ids")
        if attention_mask is None:
            real = input_ids != 0
        else:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                                 f"{tuple(input_ids.shape)}")
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (item)")
            real = attention_mask.bool()
            if bool((real & (input_ids == 0)).any()):
                row = int((real & (input_ids == 0)).nonzero()[0, 0])
                raise ValueError(f"attention_mask marks the padding id 0 as an item in row {row}")
        order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)
        return cls(order=order, lengths=real.sum(dim=1))

    @property
    def real(self) -> torch.Tensor:
        """bool [B, L]: which left-aligned positions hold an item."""
        return torch.arange(self.order.shape[1], device=self.order.device)[None, :] < self.lengths[:, None]

    def align(self, x: torch.Tensor) -> torch.Tensor:
        """Caller layout -> left-aligned layout, along dim 1 of x [B, L, ...]."""
        index = self.order.view(*self.order.shape, *([1] * (x.dim() - 2))).expand_as(x)
        return x.gather(1, index)

    def to_caller(self, x: torch.Tensor) -> torch.Tensor:
        """Left-aligned -> caller layout for x [B, L, ...]; padding positions come back as zeros."""
        x = x * self.real.view(*self.real.shape, *([1] * (x.dim() - 2))).to(x.dtype)
        index = self.order.view(*self.order.shape, *([1] * (x.dim() - 2))).expand_as(x)
        return torch.zeros_like(x).scatter(1, index, x)

    def last_positions(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-aligned positions of each history's last `count` items ([B, count]) and which of them exist."""
        positions = self.lengths[:, None] - count + torch.arange(count, device=self.lengths.device)[None, :]
        return positions.clamp(min=0), positions >= 0
