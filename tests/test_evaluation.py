"""Ranking evaluation (full, history exclusion, uni100, popularity) against a fake scorer with known answers."""

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset

from blossomrec_hf.batching import NegativeSampler, left_pad
from blossomrec_hf.evaluation import (MAX_SCORES_PER_BATCH, RankingEvaluator, default_eval_batch_size, item_popularity,
                                      target_ranks)

N_ITEMS = 200


class NextIdScorer(torch.nn.Module):
    """Scores item i by -|i - (last item + 1)|: it always predicts "the next id", ties broken towards lower ids.
    Takes packed histories, as evaluation gives them."""

    def forward(self, input_ids, position_ids, logits_to_keep=0):
        ids, positions = input_ids.flatten(), position_ids.flatten()
        last = ids[torch.cat([positions[1:] == 0, torch.tensor([True])])].float()[:, None]
        items = torch.arange(N_ITEMS + 1, dtype=torch.float32)
        scores = -(items - (last + 1)).abs() - 1e-3 * items
        scores[:, 0] = -1e9
        return SimpleNamespace(logits=scores[:, None, :])


def test_rank_counts_higher_and_tied_scores_but_never_the_padding_column():
    scores = torch.tensor([[100.0, 0.1, 0.5, 0.3, 0.9, 0.3]])
    target = torch.tensor([3])
    assert target_ranks(scores, target).tolist() == [3]  # 0.5, 0.9 and the tie at item 5; column 0 does not count


def test_collapsed_scores_rank_the_target_last():
    scores = torch.zeros(2, 8)
    assert target_ranks(scores, torch.tensor([1, 7])).tolist() == [6, 6]
    assert target_ranks(scores, torch.tensor([2]), candidates=torch.tensor([[3, 4, 5]])).tolist() == [3]


def test_history_exclusion_keeps_the_target():
    scores = torch.tensor([[0.0, 0.1, 0.5, 0.3, 0.9, 0.3]])
    history = torch.tensor([[4, 3, 0]])  # item 3 is also the target: it must stay ranked
    assert target_ranks(scores, torch.tensor([3]), history_items=history).tolist() == [2]  # item 2, and the tie at 5


def test_sampled_candidates_restrict_the_competition():
    scores = torch.tensor([[0.0, 0.1, 0.5, 0.3, 0.9, 0.3]])
    assert target_ranks(scores, torch.tensor([3]), candidates=torch.tensor([[1, 2]])).tolist() == [1]


def test_half_precision_scores_are_ranked_and_nan_is_an_error():
    scores = torch.tensor([[0.0, 0.1, 0.5, 0.3]], dtype=torch.bfloat16)
    assert target_ranks(scores, torch.tensor([1])).tolist() == [2]
    with pytest.raises(FloatingPointError, match="NaN"):
        target_ranks(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([2]))


def test_popularity_orders_by_count_then_id():
    train = Dataset.from_dict({"items": [[1, 2, 2], [2, 3]]})
    popularity = item_popularity(train, n_items=4)
    ranks = target_ranks(popularity.expand(4, -1), torch.tensor([2, 1, 3, 4]))
    assert ranks.tolist() == [0, 1, 2, 3]  # counts 2:3, 1:1, 3:1, 4:0; ties by id


def test_negative_sampler_is_deterministic_and_avoids_interacted_items():
    sampler = NegativeSampler(n_items=300, num_negatives=100, seed=7)
    interacted = list(range(1, 151))
    negatives = sampler("alice", interacted)
    assert negatives == sampler("alice", interacted)
    assert negatives != sampler("bob", interacted)
    assert len(set(negatives)) == 100 and min(negatives) > 150 and max(negatives) <= 300
    with pytest.raises(ValueError, match="fewer than 100"):
        NegativeSampler(n_items=120, num_negatives=100)("carol", list(range(1, 40)))


def test_left_pad_keeps_the_most_recent_items():
    assert left_pad([[1, 2, 3, 4], [5]], max_length=3).tolist() == [[2, 3, 4], [0, 0, 5]]


def _split():
    # The scorer predicts last + 1, then alternates outwards (last, last + 2, last - 1, ...).
    # Users 0-3: the target is last + 1 (rank 0). User 4: predicted 10, target 6 behind 10, 9, 11, 8, 12, 7, 13
    # (rank 7; rank 6 once the history item 9 is excluded). User 5: predicted 16, target 14 behind 16, 15, 17
    # (rank 3; rank 2 once 15 is excluded).
    histories = [[1, 2], [5, 6, 7], [12], [20, 21], [4, 9], [10, 15]]
    targets = [3, 8, 13, 22, 6, 14]
    return Dataset.from_dict({"user": [f"u{i}" for i in range(6)], "history": histories, "target": targets})


def _evaluator(batch_size=4, **options):
    train = Dataset.from_dict({"items": [[3, 3, 3, 1], [3, 2]]})
    return RankingEvaluator(_split(), train, n_items=N_ITEMS, max_seq_length=5, accelerator=Accelerator(cpu=True),
                            batch_size=batch_size, **options)


def test_full_ranking_with_a_fake_model():
    metrics = _evaluator().evaluate_model(NextIdScorer())
    assert metrics["num_users"] == 6
    assert metrics["recall@5"] == pytest.approx(5 / 6)
    assert metrics["recall@10"] == pytest.approx(1.0)
    assert metrics["ndcg@10"] == pytest.approx((4 + 1 / math.log2(9) + 1 / math.log2(5)) / 6)
    assert metrics["mrr@10"] == pytest.approx((4 + 1 / 8 + 1 / 4) / 6)


def test_models_score_with_exact_float32_matmuls_whatever_training_uses():
    class PrecisionRecorder(NextIdScorer):
        def forward(self, *args, **kwargs):
            seen.add(torch.get_float32_matmul_precision())
            return super().forward(*args, **kwargs)

    seen = set()
    default = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as a TF32 training run sets it
    try:
        _evaluator().evaluate_model(PrecisionRecorder())
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(default)
    assert seen == {"highest"}


def test_history_exclusion_with_a_fake_model():
    metrics = _evaluator(exclude_history=True).evaluate_model(NextIdScorer())
    assert metrics["mrr@10"] == pytest.approx((4 + 1 / 7 + 1 / 3) / 6)


def test_popularity_baseline_counts_training_items():
    # Popularity order 3, 1, 2, 4, 5, ...: target ranks 0, 7, 12, 21, 5, 13.
    metrics = _evaluator().evaluate_popularity()
    assert metrics["num_users"] == 6
    assert (metrics["recall@5"], metrics["recall@10"], metrics["recall@20"]) == pytest.approx((1 / 6, 3 / 6, 5 / 6))


def test_uni100_is_deterministic_and_never_harder_than_full_ranking():
    full = _evaluator().evaluate_model(NextIdScorer())
    sampled = _evaluator(mode="uni100", seed=3).evaluate_model(NextIdScorer())
    assert sampled == _evaluator(mode="uni100", seed=3).evaluate_model(NextIdScorer())
    assert sampled["num_users"] == 6
    assert all(sampled[name] >= full[name] for name in full if name != "num_users")
    with pytest.raises(ValueError, match="unknown evaluation mode"):
        _evaluator(mode="uni50")


class RecordingScorer(NextIdScorer):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, input_ids, position_ids, logits_to_keep=0):
        self.shapes.append(tuple(input_ids.shape))
        return super().forward(input_ids, position_ids, logits_to_keep)


def test_a_token_budget_cuts_batches_without_changing_a_score():
    whole, sliced = RecordingScorer(), RecordingScorer()
    reference = _evaluator().evaluate_model(whole)
    assert [shape[1] for shape in whole.shapes] == [8, 4]  # 4 users a batch, packed: no padding
    assert _evaluator(max_tokens_per_forward=5).evaluate_model(sliced) == reference
    assert [shape[1] for shape in sliced.shapes] == [5, 5, 2]  # consecutive users (2, 3, 1, 2, 2, 2 items) up to 5
    assert _evaluator(max_tokens_per_forward=1).evaluate_model(RecordingScorer()) == reference  # one user at least
    with pytest.raises(ValueError, match="max_tokens_per_forward"):
        _evaluator(max_tokens_per_forward=0)


def test_every_user_is_scored_once_whatever_the_process_count():
    """Two processes' shares of the batches cover the split exactly, and their ranks go back in split order."""
    from blossomrec_hf.batching import EvaluationCollator, evaluation_dataloader
    shares = [evaluation_dataloader(_split(), EvaluationCollator(5), max_seq_length=5, max_tokens=4, max_histories=4,
                                    process_index=rank, num_processes=2) for rank in range(2)]
    users = [int(i) for share in shares for batch in share for i in batch["user_index"]]
    assert sorted(users) == list(range(6))


def test_evaluation_batches_default_to_a_score_budget_and_refuse_bad_sizes():
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert default_eval_batch_size(12101, gpu) == 2772
    assert default_eval_batch_size(1682, gpu) * 1683 <= MAX_SCORES_PER_BATCH
    assert default_eval_batch_size(10**9, gpu) == 1 and default_eval_batch_size(12101, cpu) == 256
    batches = list(_evaluator(batch_size=None).dataloader)  # 6 users on the CPU: one batch of at most 256
    assert len(batches) == 1 and len(batches[0]["targets"]) == 6
    assert len(list(_evaluator(batch_size=4).dataloader)) == 2
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="--per_device_eval_batch_size must be a positive int"):
            _evaluator(batch_size=bad)
