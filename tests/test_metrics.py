"""Ranking metrics against values computed by hand."""

import math

import pytest
import torch

from blossomrec_hf.metrics import format_metrics_table, per_user_metrics, ranking_metrics


def test_single_user_metrics_by_hand():
    # Target ranked third (two items scored higher): 0-based rank 2.
    values = per_user_metrics(torch.tensor([2]), ks=(1, 3, 5))
    assert values["recall@1"].item() == 0.0
    assert values["ndcg@1"].item() == 0.0
    assert values["mrr@1"].item() == 0.0
    assert values["recall@3"].item() == 1.0
    assert values["ndcg@3"].item() == pytest.approx(0.5)  # 1 / log2(2 + 2)
    assert values["mrr@3"].item() == pytest.approx(1 / 3)
    assert values["ndcg@5"].item() == pytest.approx(0.5)


def test_means_over_users_by_hand():
    ranks = torch.tensor([0, 1, 4, 9, 19, 25])
    metrics = ranking_metrics(ranks)
    assert metrics["num_users"] == 6
    assert metrics["recall@5"] == pytest.approx(3 / 6)
    assert metrics["recall@10"] == pytest.approx(4 / 6)
    assert metrics["recall@20"] == pytest.approx(5 / 6)
    # NDCG@5 = (1/log2(2) + 1/log2(3) + 1/log2(6)) / 6 = (1 + 0.63093 + 0.38685) / 6
    assert metrics["ndcg@5"] == pytest.approx((1 + 0.6309298 + 0.3868528) / 6, abs=1e-6)
    # NDCG@10 adds rank 9: 1/log2(11) = 0.28906
    assert metrics["ndcg@10"] == pytest.approx((1 + 0.6309298 + 0.3868528 + 0.2890648) / 6, abs=1e-6)
    assert metrics["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 6)
    assert metrics["mrr@10"] == pytest.approx(0.3)  # (1 + 0.5 + 0.2 + 0.1) / 6
    assert metrics["mrr@20"] == pytest.approx((1.8 + 1 / 20) / 6)


def test_perfect_and_hopeless_rankings():
    assert all(v == 1.0 for k, v in ranking_metrics(torch.zeros(4, dtype=torch.long)).items() if k != "num_users")
    assert all(v == 0.0 for k, v in ranking_metrics(torch.full((3,), 50)).items() if k != "num_users")


def test_ndcg_matches_dcg_definition():
    for rank in range(12):
        expected = 1 / math.log2(rank + 2) if rank < 10 else 0.0
        assert per_user_metrics(torch.tensor([rank]))["ndcg@10"].item() == pytest.approx(expected)


def test_invalid_ranks_are_rejected():
    with pytest.raises(ValueError, match="zero users"):
        ranking_metrics(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="negative"):
        ranking_metrics(torch.tensor([-1]))


def test_table_lists_every_method_and_metric():
    table = format_metrics_table({"BlossomRec": ranking_metrics(torch.tensor([0, 3])),
                                  "popularity": ranking_metrics(torch.tensor([7, 30]))})
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["method", "recall@5", "recall@10", "recall@20"]
    assert lines[2].startswith("BlossomRec") and lines[3].startswith("popularity")
    assert "0.5000" in lines[3]  # popularity recall@10: one of two users
