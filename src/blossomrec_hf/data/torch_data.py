"""Torch datasets over ``SequenceData``: padded windows, built once as tensors.

Training (SPEC section 1): causal next-item prediction at every position. A window of
``max_len + 1`` consecutive items gives ``item_ids = w[:-1]`` and ``labels = w[1:]``;
positions without a target (padding) carry ``IGNORE_INDEX`` (-100, the ``ignore_index`` of
``torch.nn.functional.cross_entropy`` and of Hugging Face models).

Evaluation: one row per user, ``item_ids`` = the last ``max_len`` items of the history,
``target`` = the held-out item, ``user`` = the user index; optionally ``negatives``, 100 (or
``n``) items the user never interacted with, for sampled ("uni100") ranking.

Padding is item 0. ``padding_side="left"`` (default, as SASRec) puts the newest item at
position ``max_len - 1`` in every row; ``"right"`` starts every row at position 0.

Rows are dicts of tensors, so ``torch.utils.data.DataLoader`` (default collate) and the
Hugging Face ``Trainer`` (``default_data_collator``) batch them; ``.batches()`` slices whole
batches without a per-row collate and is the fast path.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .sequences import SequenceData

__all__ = ["IGNORE_INDEX", "SequenceDataset", "train_dataset", "eval_dataset", "pad_windows", "sample_negatives"]

IGNORE_INDEX = -100


def pad_windows(items: np.ndarray, start: np.ndarray, end: np.ndarray, length: int,
                padding_side: str = "left") -> np.ndarray:
    """Row r holds ``items[max(start[r], end[r] - length):end[r]]`` padded with 0 to ``length``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    first = np.maximum(start, end - length)[:, None]
    cols = np.arange(length)[None, :]
    if padding_side == "left":
        idx = end[:, None] - length + cols
    else:
        idx = first + cols
    valid = (idx >= first) & (idx < end[:, None])
    return np.where(valid, items[np.where(valid, idx, 0)], 0) if len(items) else np.zeros((len(end), length), np.int64)


class SequenceDataset(torch.utils.data.Dataset):
    """Equal-length tensors under names; row i is ``{name: tensor[i]}``."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        sizes = {len(t) for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors differ in length: { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def to(self, device) -> "SequenceDataset":
        """Move every tensor (e.g. to the GPU once, then batch there without host copies)."""
        return SequenceDataset({k: v.to(device) for k, v in self.tensors.items()})

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False, device=None) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for lo in range(0, stop, batch_size):
            if order is None:
                batch = {k: v[lo:lo + batch_size] for k, v in self.tensors.items()}
            else:
                idx = order[lo:lo + batch_size]
                batch = {k: v[idx.to(v.device)] for k, v in self.tensors.items()}
            if device is not None:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            yield batch


def train_dataset(data: SequenceData, max_len: int, *, holdout: int = 2, windows: str = "last",
                  padding_side: str = "left") -> SequenceDataset:
    """Training windows of ``max_len`` inputs with next-item labels.

    ``holdout``: see ``SequenceData.train_ends`` (2: leave-one-out training; 0: everything).
    ``windows="last"``: one window per user, the latest ``max_len + 1`` items (SASRec).
    ``windows="all"``: windows tiled back from the latest so that every transition of the
    training prefix is a target exactly once; longer histories give more rows.
    """
    start, end = data.offsets[:-1], data.train_ends(holdout)
    keep = end - start >= 2  # a window needs one transition
    start, end = start[keep], end[keep]
    if windows == "all":
        n_windows = (end - start - 2) // max_len + 1
        k = np.arange(n_windows.sum()) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
        start = np.repeat(start, n_windows)
        end = np.repeat(end, n_windows) - k * max_len
    elif windows != "last":
        raise ValueError(f"windows must be 'last' or 'all', got {windows!r}")
    w = pad_windows(data.items, start, end, max_len + 1, padding_side)
    inputs, labels = w[:, :-1], w[:, 1:]
    labels = np.where((inputs == 0) | (labels == 0), IGNORE_INDEX, labels)
    return SequenceDataset({"item_ids": torch.from_numpy(inputs.copy()), "labels": torch.from_numpy(labels)})


def eval_dataset(data: SequenceData, split: str, max_len: int, *, padding_side: str = "left",
                 negatives: int = 0, seed: int = 0) -> SequenceDataset:
    """One row per evaluated user: history (``item_ids``), ``target`` and ``user``.

    ``split`` is ``"valid"`` or ``"test"``. ``negatives=n`` adds ``negatives[n]``: items the
    user never interacted with, uniform without replacement, fixed by ``seed``.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    users, end = data.eval_ends(split)
    hist = pad_windows(data.items, data.offsets[users], end, max_len, padding_side)
    tensors = {
        "item_ids": torch.from_numpy(hist),
        "target": torch.from_numpy(data.items[end]),
        "user": torch.from_numpy(users.astype(np.int64)),
    }
    if negatives:
        tensors["negatives"] = torch.from_numpy(sample_negatives(data, users, negatives, seed))
    return SequenceDataset(tensors)


def sample_negatives(data: SequenceData, users: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``[len(users), n]`` item ids outside each user's whole sequence, distinct within a row."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(users), n), dtype=np.int64)
    for r, u in enumerate(users):
        seen = set(data[u].tolist())
        if data.n_items - len(seen) < n:
            raise ValueError(f"user {u} has fewer than {n} unseen items")
        chosen: dict[int, None] = {}
        while len(chosen) < n:
            for t in rng.integers(1, data.n_items + 1, size=2 * n).tolist():
                if t not in seen and t not in chosen:
                    chosen[t] = None
                    if len(chosen) == n:
                        break
        out[r] = list(chosen)
    return out
