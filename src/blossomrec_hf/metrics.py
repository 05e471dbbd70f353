"""Top-K ranking metrics for next-item prediction with exactly one target per user.

Every metric is a function of the target's 0-based rank (the number of candidates placed before it):
with one relevant item, Recall@K equals HR@K, NDCG@K reduces to 1 / log2(rank + 2) (the ideal DCG is 1),
and MRR@K is 1 / (rank + 1); all three are 0 when the target falls outside the top K.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

DEFAULT_KS = (5, 10, 20)
METRIC_NAMES = ("recall", "ndcg", "mrr")


def per_user_metrics(ranks: torch.Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[str, torch.Tensor]:
    """Metric values per user, keyed like ``"ndcg@10"``, from 0-based target ranks of shape ``[num_users]``."""
    ranks = torch.as_tensor(ranks).to(torch.float64)
    if ranks.dim() != 1:
        raise ValueError(f"ranks must be a 1-D tensor with one rank per user, got shape {tuple(ranks.shape)}")
    if (ranks < 0).any():
        raise ValueError("ranks are 0-based counts of better-scored candidates and cannot be negative")
    values = {}
    for k in ks:
        hit = (ranks < k).to(torch.float64)
        values[f"recall@{k}"] = hit
        values[f"ndcg@{k}"] = hit / torch.log2(ranks + 2.0)
        values[f"mrr@{k}"] = hit / (ranks + 1.0)
    return values


def ranking_metrics(ranks: torch.Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean of each metric over users, plus ``num_users`` (how many ranks went into the means)."""
    ranks = torch.as_tensor(ranks)
    if ranks.numel() == 0:
        raise ValueError("cannot compute ranking metrics over zero users")
    means = {name: float(values.mean()) for name, values in per_user_metrics(ranks, ks).items()}
    return {**means, "num_users": int(ranks.numel())}


def format_metrics_table(rows: dict[str, dict[str, float]], ks: Iterable[int] = DEFAULT_KS) -> str:
    """A plain-text table: one row per method (e.g. the model and the popularity baseline), one column per metric."""
    columns = [f"{name}@{k}" for name in METRIC_NAMES for k in ks]
    header = ["method", *columns, "users"]
    body = [
        [method, *(f"{values[column]:.4f}" for column in columns), str(values.get("num_users", ""))]
        for method, values in rows.items()
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in
                       enumerate(zip(row, widths))) for row in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
