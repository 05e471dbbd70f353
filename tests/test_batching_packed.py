"""Token-budget batches of similar-length windows, packed into one row per batch."""

import numpy as np
import pytest
import torch

from blossomrec_hf.batching import PackedTrainingCollator, TokenBudgetBatchSampler


def heavy_tailed_lengths(count=500, longest=51, seed=0):
    rng = np.random.default_rng(seed)
    return np.minimum(np.exp(rng.uniform(np.log(2), np.log(200), count)).astype(int), longest).tolist()


def test_every_window_once_per_epoch_within_the_budget_and_the_same_batch_count():
    lengths = heavy_tailed_lengths()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=256, seed=3)
    counts = set()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        counts.add(len(batches))
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in batch) <= 256 for batch in batches)
        # similar lengths: within a batch, the longest window is at most a little longer than the shortest
        spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
        assert np.median(spread) <= 2
    assert counts == {len(sampler)}


def test_the_order_depends_only_on_seed_and_epoch_and_changes_between_epochs():
    lengths = heavy_tailed_lengths()
    first, second = TokenBudgetBatchSampler(lengths, 256, seed=3), TokenBudgetBatchSampler(lengths, 256, seed=3)
    second.set_epoch(1)
    first.set_epoch(1)
    state = torch.random.get_rng_state()
    assert list(first) == list(second)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG (dropout's) is untouched
    first.set_epoch(2)
    epoch_two = list(first)
    assert epoch_two != list(second)
    assert {tuple(sorted(b)) for b in epoch_two} != {tuple(sorted(b)) for b in list(second)}  # new batch members


def test_a_budget_below_the_longest_window_names_the_flag():
    with pytest.raises(ValueError, match="--max_tokens_per_batch 40 is smaller than the longest training window"):
        TokenBudgetBatchSampler([3, 51, 7], max_tokens=40, seed=0)


def test_packed_collator_matches_the_flattening_convention():
    batch = PackedTrainingCollator(max_seq_length=3)([{"input_ids": [5, 6, 7]}, {"input_ids": [1, 2, 3, 4, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 3, 4, 9]]  # windows cut to max_seq_length + 1
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 3, 4, 9]]
    assert batch["num_targets"] == 5


def test_static_packed_batches_fill_the_budget_and_a_fixed_number_of_histories():
    """--torch_compile's packed batches: the windows, then padding histories (id 0, labels -100, at most a window
    long) up to the budget, then empty histories up to the number every batch of the sampler fits in."""
    batch = PackedTrainingCollator(max_seq_length=3, static_shape=(14, 6))([{"input_ids": [5, 6, 7]},
                                                                            {"input_ids": [1, 2, 3, 4, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 3, 4, 9] + [0] * 7]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 3, 4, 9] + [-100] * 7]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 7, 11, 14, 14, 14] and batch["max_length_q"] == 4
    assert batch["num_targets"] == 5
    with pytest.raises(ValueError, match="exceed the batch's 3 histories"):
        PackedTrainingCollator(max_seq_length=3, static_shape=(14, 3))([{"input_ids": [5, 6, 7]}])

    lengths = heavy_tailed_lengths()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=256, seed=3)
    num_tokens, num_histories = sampler.static_shape(max_length=51)
    collator = PackedTrainingCollator(max_seq_length=50, static_shape=(num_tokens, num_histories))
    shapes = {(tuple(b["input_ids"].shape), tuple(b["cu_seq_lens_q"].shape))
              for b in (collator([{"input_ids": [1] * lengths[i]} for i in batch]) for batch in sampler)}
    assert shapes == {((1, 256), (num_histories + 1,))}
    assert num_histories == max(len(b) + -(-(256 - sum(lengths[i] for i in b)) // 51) for b in sampler)


def test_static_padded_and_evaluation_batches_have_one_shape():
    from datasets import Dataset

    from blossomrec_hf.batching import EvaluationCollator, TrainingCollator, evaluation_dataloader

    batch = TrainingCollator(max_seq_length=3, num_rows=3)([{"input_ids": [5, 6]}, {"input_ids": [1, 2, 3, 4, 9]}])
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6], [2, 3, 4, 9], [0, 0, 0, 0]]
    assert batch["num_targets"] == 4
    split = Dataset.from_dict({"user": list("abcde"), "history": [[1, 2], [3] * 7, [4], [5, 6, 7], [8] * 3],
                               "target": [1, 2, 3, 4, 5]})
    loader = evaluation_dataloader(split, EvaluationCollator(5), max_seq_length=5, max_tokens=6, max_histories=2,
                                   static_shapes=True)
    batches = list(loader)  # users' histories of 2 | 5 (7 cut to 5), 1 | 3, 3 items
    assert {tuple(b["input_ids"].shape) for b in batches} == {(1, 6)}  # the most items of a batch
    assert [b["cu_seq_lens_q"].tolist() for b in batches] == [[0, 2, 6], [0, 5, 6], [0, 3, 6]]
    assert batches[0]["input_ids"].tolist() == [[1, 2, 0, 0, 0, 0]]  # then a padding history of 4
    assert [b["targets"].tolist() for b in batches] == [[1], [2, 3], [4, 5]]


def test_packed_training_resumes_to_the_uninterrupted_run(tmp_path):
    """--max_tokens_per_batch: a run stopped by SIGTERM (at step 7, via the trainer) and resumed ends as the run that was
    never stopped: the epoch order lives in the token-budget sampler and is restored with the epoch."""
    import sys

    from test_train_resume import SIGNALLED_TRAIN
    from train_helpers import TINY_MODEL, TRAIN, assert_same_run, check, python_command, run_script, \
        write_sequences_file

    log = write_sequences_file(tmp_path / "log.txt", num_users=101)

    def arguments(output_dir):
        return ["--dataset", str(log), "--output_dir", str(output_dir), *TINY_MODEL, "--hidden_dropout_prob", "0.3",
                "--max_tokens_per_batch", "96", "--max_steps", "12", "--eval_steps", "6", "--save_steps", "1",
                "--logging_steps", "1", "--seed", "5"]

    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    check(run_script(python_command(TRAIN, *arguments(reference))))
    stopped = run_script([sys.executable, "-c", SIGNALLED_TRAIN, TRAIN, *arguments(interrupted)],
                         extra_env={"SIGNAL_AT": "7"})
    assert stopped.returncode != 0 and "stopped by signal at step 7" in stopped.stdout
    check(run_script(python_command(TRAIN, *arguments(interrupted), "--resume_from_checkpoint", "latest")))
    assert_same_run(reference, interrupted, 12)


def test_columnar_batches_equal_row_batches():
    """The loaders fetch a batch's columns at once (`TrainingWindows`, `EvaluationRows`); the collators give the same
    batch from them as from row mappings."""
    from datasets import Dataset

    from blossomrec_hf.batching import (EvaluationCollator, EvaluationRows, NegativeSampler, PackedTrainingCollator,
                                        TrainingCollator, TrainingWindows)

    windows = Dataset.from_dict({"input_ids": [[5, 6, 7], [1, 2, 3, 4, 9], [8, 3]]})
    store, picked = TrainingWindows(windows, window_length=4), [2, 0, 1]
    for collator in (PackedTrainingCollator(3), PackedTrainingCollator(3, static_shape=(14, 6)), TrainingCollator(3)):
        from_rows, from_columns = collator([windows[i] for i in picked]), collator(store.__getitems__(picked))
        assert from_rows.keys() == from_columns.keys()
        for name, value in from_rows.items():
            assert torch.equal(value, from_columns[name]) if torch.is_tensor(value) else value == from_columns[name]
    split = Dataset.from_dict({"user": ["a", "b", "c"], "history": [[1, 2], [3] * 7, [4]], "target": [5, 6, 7]})
    rows, picked = EvaluationRows(split), [2, 0]
    for collator in (EvaluationCollator(5, exclude_history=True),
                     EvaluationCollator(5, negative_sampler=NegativeSampler(9, 2, seed=0))):
        from_rows, from_columns = collator([rows[i] for i in picked]), collator(rows.__getitems__(picked))
        assert from_rows.keys() == from_columns.keys()
        for name, value in from_rows.items():
            assert torch.equal(value, from_columns[name]), name
