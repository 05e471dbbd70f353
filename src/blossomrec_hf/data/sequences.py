"""Per-user item sequences in time order, and the leave-one-out protocol over them.

Item ids are ``1 .. n_items`` (0 is padding, row 0 of the embedding table); user ids are
``0 .. n_users - 1``. Both are ranks of the sorted raw ids, so a file whose ids already are
``1 .. n`` (Beauty.txt) keeps them. Sequences are stored flat (CSR): user ``u`` owns
``items[offsets[u]:offsets[u + 1]]``, oldest first.

Leave-one-out (SPEC section 4): with ``n`` interactions, the last item is the test target
(history: the ``n - 1`` before it), the second-to-last the validation target (history: the
``n - 2`` before it), and training sees the first ``n - 2``. Users with fewer than 3
interactions have no validation or test example and train on everything (as SASRec does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .readers import read_interactions

__all__ = ["SequenceData", "load_sequences"]

EVAL_HOLDOUT = {"valid": 2, "test": 1}  # the target is this many items from the end
MIN_EVAL_LENGTH = 3


def _encode(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Codes 0..k-1 by sorted raw id, and the sorted raw ids (hash-based, no sort of the rows)."""
    if col.null_count:
        raise ValueError(f"{col.null_count} interactions have no user or item id")
    vocab = pc.unique(col)
    vocab = vocab.take(pc.array_sort_indices(vocab))
    codes = pc.index_in(col, value_set=vocab).to_numpy()
    return codes.astype(np.int64), vocab.to_numpy(zero_copy_only=False)


def _k_core(user: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
    """Mask of the interactions kept by iterated k-core filtering (each user and item >= k)."""
    keep = np.ones(len(user), dtype=bool)
    while True:
        u_count = np.bincount(user[keep], minlength=user.max(initial=-1) + 1)
        i_count = np.bincount(item[keep], minlength=item.max(initial=-1) + 1)
        new = keep & (u_count[user] >= k) & (i_count[item] >= k)
        if new.sum() == keep.sum():
            return keep
        keep = new


@dataclass
class SequenceData:
    offsets: np.ndarray  # int64 [n_users + 1]
    items: np.ndarray  # int64 [n_interactions], values 1..n_items
    user_vocab: np.ndarray  # raw user id of each user index
    item_vocab: np.ndarray  # raw item id of item id i is item_vocab[i - 1]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_interactions(
        cls,
        table: pa.Table,
        *,
        min_rating: float | None = None,
        k_core: int | None = None,
    ) -> "SequenceData":
        """Group a table from ``read_interactions`` into time-ordered sequences.

        Rows are ordered by timestamp within each user by a stable sort, so ties (and
        sources without timestamps) keep file order. ``min_rating`` keeps rows rated at
        least that; ``k_core`` iterates until every user and item has at least k rows.
        """
        if min_rating is not None:
            if "rating" not in table.column_names:
                raise KeyError("min_rating given but the log has no rating column")
            table = table.filter(pc.greater_equal(table.column("rating"), min_rating))
        user, user_vocab = _encode(table.column("user"))
        item, item_vocab = _encode(table.column("item"))
        keys = {"user": user}
        if "timestamp" in table.column_names:
            keys["timestamp"] = table.column("timestamp")
        # Arrow's sort_indices is stable: equal (user, timestamp) rows keep file order.
        order = pc.sort_indices(pa.table(keys), sort_keys=[(k, "ascending") for k in keys]).to_numpy()
        user, item = user[order], item[order]
        if k_core:
            keep = _k_core(user, item, k_core)
            user, item = user[keep], item[keep]
            kept_users, user = np.unique(user, return_inverse=True)
            kept_items, item = np.unique(item, return_inverse=True)
            user_vocab, item_vocab = user_vocab[kept_users], item_vocab[kept_items]
        offsets = np.zeros(len(user_vocab) + 1, dtype=np.int64)
        np.cumsum(np.bincount(user, minlength=len(user_vocab)), out=offsets[1:])
        return cls(offsets, item.astype(np.int64) + 1, user_vocab, item_vocab)

    @classmethod
    def from_lists(cls, sequences: list[list[int]]) -> "SequenceData":
        """Sequences given directly as item ids ``>= 1``; user i is list i (tests, toy data)."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        items = np.array([i for s in sequences for i in s], dtype=np.int64)
        if items.size and items.min() < 1:
            raise ValueError("item ids start at 1 (0 is padding)")
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        n_items = int(items.max(initial=0))
        return cls(offsets, items, np.arange(len(sequences)), np.arange(1, n_items + 1))

    # ------------------------------------------------------------------ access

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_items(self) -> int:
        """Number of real items; the embedding table has ``n_items + 1`` rows."""
        return len(self.item_vocab)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.n_users

    def __getitem__(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user]:self.offsets[user + 1]]

    def encode_items(self, raw_ids) -> np.ndarray:
        """Item ids (1..n_items) of raw ids; unknown ids map to 0 (padding)."""
        raw = np.asarray(raw_ids, dtype=self.item_vocab.dtype)
        pos = np.searchsorted(self.item_vocab, raw).clip(0, max(self.n_items - 1, 0))
        found = self.item_vocab[pos] == raw if self.n_items else np.zeros(raw.shape, bool)
        return np.where(found, pos + 1, 0).astype(np.int64)

    def decode_items(self, ids) -> np.ndarray:
        """Raw ids of item ids 1..n_items."""
        return self.item_vocab[np.asarray(ids) - 1]

    def stats(self) -> dict[str, Any]:
        lengths = self.lengths
        n = int(lengths.sum())
        return {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": n,
            "mean_length": float(lengths.mean()) if self.n_users else 0.0,
            "max_length": int(lengths.max(initial=0)),
            "density": n / max(self.n_users * self.n_items, 1),
        }

    # ------------------------------------------------------------------ leave-one-out

    def eval_users(self) -> np.ndarray:
        """Users with a validation and a test example (at least 3 interactions)."""
        return np.flatnonzero(self.lengths >= MIN_EVAL_LENGTH)

    def train_ends(self, holdout: int = 2) -> np.ndarray:
        """End of each user's training prefix, ``items[offsets[u]:end[u]]``.

        Evaluated users (``eval_users``) leave out their last ``holdout`` items: 2 keeps the
        validation and test targets out, 1 trains on the validation targets, 0 on everything.
        Users too short to evaluate train on all their items.
        """
        return self.offsets[1:] - np.where(self.lengths >= MIN_EVAL_LENGTH, holdout, 0)

    def eval_ends(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(users, end)`` of ``"valid"`` or ``"test"``: history ``items[offsets[u]:end]``, target ``items[end]``."""
        if split not in EVAL_HOLDOUT:
            raise ValueError(f"split must be one of {tuple(EVAL_HOLDOUT)}, got {split!r}")
        users = self.eval_users()
        return users, self.offsets[users + 1] - EVAL_HOLDOUT[split]

    def seen_items(self, users, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Every item of each user's ``split`` history (untruncated), to mask in full ranking.

        ``users``: user indices, e.g. a batch's ``user``. Returns ``(row, item)``, row indexing
        ``users``: ``scores[row, item] = -inf`` removes the items already seen.
        """
        users = np.asarray(users, dtype=np.int64)
        start = self.offsets[users]
        counts = self.offsets[users + 1] - EVAL_HOLDOUT[split] - start
        row = np.repeat(np.arange(len(users)), counts)
        first = np.repeat(start - (np.cumsum(counts) - counts), counts)
        return row, self.items[first + np.arange(counts.sum())]

    # ------------------------------------------------------------------ save / load

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``sequences.parquet`` (user, items) and ``items.parquet`` (the vocabulary).

        ``items.parquet`` row i is item id i + 1; it is what a trained model needs to map
        its scores back to raw ids.
        """
        import pyarrow.parquet as pq

        os.makedirs(directory, exist_ok=True)
        seqs = pa.ListArray.from_arrays(pa.array(self.offsets, pa.int64()), pa.array(self.items, pa.int64()))
        pq.write_table(pa.table({"user": self.user_vocab, "items": seqs}),
                       os.path.join(directory, "sequences.parquet"))
        pq.write_table(pa.table({"item": self.item_vocab}), os.path.join(directory, "items.parquet"))
        with open(os.path.join(directory, "stats.json"), "w") as f:
            json.dump(self.stats(), f, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SequenceData":
        import pyarrow.parquet as pq

        seqs = pq.read_table(os.path.join(directory, "sequences.parquet"))
        items = pq.read_table(os.path.join(directory, "items.parquet"))
        lists = seqs.column("items").combine_chunks()
        offsets = lists.offsets.to_numpy().astype(np.int64)
        flat = lists.values.to_numpy().astype(np.int64)
        return cls(offsets - offsets[0], flat[offsets[0]:offsets[-1]],
                   seqs.column("user").to_numpy(), items.column("item").to_numpy())


def load_sequences(
    source: Any,
    format: str | None = None,
    *,
    min_rating: float | None = None,
    k_core: int | None = None,
    **read_kwargs,
) -> SequenceData:
    """``read_interactions`` then ``SequenceData.from_interactions``; a saved directory loads as is."""
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(os.path.join(source, "sequences.parquet")):
        return SequenceData.load(source)
    table = read_interactions(source, format, **read_kwargs)
    return SequenceData.from_interactions(table, min_rating=min_rating, k_core=k_core)
