"""The checks a dataset must pass before training starts, shared by ``scripts/train.py`` and
``scripts/prepare_data.py`` (which refuses to write a prepared folder that training would then refuse)."""

from __future__ import annotations

from .histories import MIN_EVALUATED_LENGTH, training_windows
from .tables import read_columns


def check_trainable(data, max_seq_length: int):
    """The training windows of ``data`` (a ``PreparedData``), or a ``ValueError`` saying why it cannot be trained on.

    Training needs users to evaluate (a user needs ``MIN_EVALUATED_LENGTH`` = 3 events: a history, a validation and
    a test target) and at least one training window (a training history of 2 or more items). The message is one
    line and says how long the histories that were kept are.
    """
    splits, info = data.splits, getattr(data, "info", {}) or {}
    filters = ", ".join(f"{key}={info[key]}" for key in ("min_history_length", "k_core")
                        if info.get(key) is not None and (key != "k_core" or info[key]))
    filters = f" ({filters})" if filters else ""
    train_lengths = read_columns(splits["train"], ["items"], what="the training split")["items"].lengths
    if len(splits["test"]) == 0 or len(splits["validation"]) == 0:
        longest = int(train_lengths.max()) if len(train_lengths) else 0
        raise ValueError(
            f"no user has the {MIN_EVALUATED_LENGTH} events that a validation and a test target need: the "
            f"{len(train_lengths)} users kept{filters} have at most {longest} event{'s' * (longest != 1)}")
    windows = training_windows(splits["train"], max_seq_length)
    if len(windows) == 0:
        longest = int(_event_counts(splits).max()) if len(train_lengths) else 0
        raise ValueError(
            f"no training windows (every training history has fewer than 2 items): a user's last 2 events are the "
            f"validation and test targets, so a user with n >= {MIN_EVALUATED_LENGTH} events trains on n - 2, and the "
            f"{len(train_lengths)} users kept{filters} have at most {longest} events")
    return windows


def _event_counts(splits):
    """Each user's number of events: the training history, plus the 2 targets of evaluated users (error path only)."""
    train = read_columns(splits["train"], ["user", "items"], what="the training split")
    lengths = train["items"].lengths.copy()
    evaluated = set(read_columns(splits["test"], ["user"], what="the test split")["user"].tolist())
    if evaluated:
        lengths[[user in evaluated for user in train["user"].tolist()]] += 2
    return lengths
