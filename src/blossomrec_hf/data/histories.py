"""From events to per-user histories, the leave-one-out split, and training windows.

Histories are in time order by a stable sort, so events with equal timestamps keep their file order (on ML-1M an
unstable sort changes about a quarter of the test targets). Users and items are numbered in order of first
appearance in the event log, which keeps ids that a file already numbers 1..n (Beauty.txt) unchanged.
"""

from __future__ import annotations

import warnings

import numpy as np

from .errors import DataWarning
from .tables import Ragged, make_table, make_table_dict, read_columns
from .vocabulary import ItemVocabulary

MIN_EVALUATED_LENGTH = 3  # a validation target, a test target and at least one item of history


def _first_appearance_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes 0..k-1 numbering the distinct values by first appearance, and those values (as strings) in that order."""
    values = values.astype(str)
    unique, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)], unique[order]


def _k_core(user: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
    """Mask of the events kept by iterated k-core filtering: every kept user and item has at least k events."""
    keep = np.ones(len(user), dtype=bool)
    while True:
        user_count = np.bincount(user[keep], minlength=user.max(initial=-1) + 1)
        item_count = np.bincount(item[keep], minlength=item.max(initial=-1) + 1)
        new = keep & (user_count[user] >= k) & (item_count[item] >= k)
        if np.array_equal(new, keep):
            return keep
        keep = new


def _warn_repeated_events(user, item, timestamp, user_names, item_names) -> None:
    """A ``DataWarning`` counting events that repeat an earlier one exactly: same user, item and timestamp (they are
    kept). Logs without time have distinct timestamps (file positions); their readers count repeated lines."""
    if len(user) < 2:
        return
    order = np.lexsort((timestamp, item, user))
    same = (np.diff(user[order]) == 0) & (np.diff(item[order]) == 0) & (np.diff(timestamp[order]) == 0)
    if same.any():
        first = order[1:][same].min()  # the first repeat in event order
        warnings.warn(f"{int(same.sum())} event(s) repeat an earlier event exactly (same user, item and timestamp; "
                      f"the first at row {int(first)}: user {str(user_names[user[first]])!r}, item "
                      f"{str(item_names[item[first]])!r}, time {timestamp[first]:g}); kept as repeated interactions",
                      DataWarning, stacklevel=3)


def build_histories(events, *, k_core: int = 0, min_history_length: int = 3):
    """One row per user: ``user`` (string) and ``items`` (internal ids, oldest first); and the item vocabulary.

    ``events`` has columns ``user``, ``item``, ``timestamp`` (``load_interactions`` or
    ``generate_synthetic_interactions``). ``k_core`` (0 = off) drops users and items with fewer than k events until
    none is left; then users with fewer than ``min_history_length`` events are dropped.
    """
    columns = read_columns(events, ["user", "item", "timestamp"], what="the events")
    if len(columns["user"]) == 0:
        raise ValueError("the event log is empty")
    user, user_names = _first_appearance_codes(columns["user"])
    item, item_names = _first_appearance_codes(columns["item"])
    timestamp = np.asarray(columns["timestamp"], dtype=np.float64)
    if np.isnan(timestamp).any():
        missing = np.flatnonzero(np.isnan(timestamp))
        raise ValueError(f"{len(missing)} events have no timestamp (NaN), the first at row {int(missing[0])} "
                         f"(counted from 0)")
    _warn_repeated_events(user, item, timestamp, user_names, item_names)
    order = np.argsort(timestamp, kind="stable")
    order = order[np.argsort(user[order], kind="stable")]
    user, item = user[order], item[order]

    keep = np.ones(len(user), dtype=bool)
    if k_core:
        keep = _k_core(user, item, k_core)
        if not keep.any():
            raise ValueError(f"no events are left after {k_core}-core filtering (k_core={k_core})")
    if min_history_length:
        length = np.bincount(user[keep], minlength=len(user_names))
        keep &= length[user] >= min_history_length
        if not keep.any():
            raise ValueError(f"no user has at least {min_history_length} events (min_history_length="
                             f"{min_history_length}{f', after k_core={k_core}' if k_core else ''})")
    user, item = user[keep], item[keep]
    kept_users, user = np.unique(user, return_inverse=True)  # codes are first-appearance ranks: order is kept
    kept_items, item = np.unique(item, return_inverse=True)
    histories = make_table({
        "user": user_names[kept_users].astype(object),
        "items": Ragged.from_lengths(np.bincount(user, minlength=len(kept_users)), item.astype(np.int64) + 1),
    })
    return histories, ItemVocabulary(item_names[kept_items].tolist())


def leave_one_out(histories):
    """Splits ``train`` (user, items), ``validation`` and ``test`` (user, history, target).

    Of a history of n items, the last is the test target (history: the n - 1 before it), the second-to-last the
    validation target (history: the n - 2 before it), and training sees the first n - 2. A history shorter than 3
    (possible only with ``min_history_length`` below 3) has no validation or test row and trains on all its items.
    """
    columns = read_columns(histories, ["user", "items"], what="the histories")
    user, items = columns["user"], columns["items"]
    start, end = items.offsets[:-1], items.offsets[1:]
    is_evaluated = items.lengths >= MIN_EVALUATED_LENGTH
    evaluated = np.flatnonzero(is_evaluated)
    splits = {"train": {"user": user, "items": items.slices(start, end - np.where(is_evaluated, 2, 0))}}
    for name, held_out in (("validation", 2), ("test", 1)):
        target_at = end[evaluated] - held_out
        splits[name] = {
            "user": user[evaluated],
            "history": items.slices(start[evaluated], target_at),
            "target": items.values[target_at],
        }
    return make_table_dict({name: make_table(split) for name, split in splits.items()})


def training_windows(train, max_seq_length: int):
    """Column ``input_ids``: windows of up to ``max_seq_length + 1`` consecutive items of each training history.

    Rows list the most recent window of every user first (in user order), then every user's next-older window, and
    so on: each history is cut into non-overlapping windows going back in time. Windows of fewer than 2 items (no
    next-item target) are dropped. The model predicts every item of a window from the ones before it.
    """
    if not isinstance(max_seq_length, (int, np.integer)) or max_seq_length < 1:
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    items = read_columns(train, ["items"], what="the training split")["items"]
    width = max_seq_length + 1
    lengths = items.lengths
    per_user = np.where(lengths >= 2, (lengths - 2) // width + 1, 0)
    row_user = np.repeat(np.arange(len(lengths)), per_user)
    back = np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user)  # 0 = most recent
    order = np.argsort(back, kind="stable")
    row_user, back = row_user[order], back[order]
    end = items.offsets[row_user + 1] - back * width
    start = np.maximum(items.offsets[row_user], end - width)
    return make_table({"input_ids": items.slices(start, end)})
