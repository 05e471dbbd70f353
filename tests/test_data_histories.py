"""Histories, leave-one-out, training windows, the vocabulary, the synthetic generator and prepared data."""

import json
import os
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset

from blossomrec_hf.data import (
    ItemVocabulary,
    PreparedData,
    build_histories,
    generate_synthetic_interactions,
    leave_one_out,
    prepare_data,
    training_windows,
)


def _events(rows):
    """rows: (user, item, timestamp) in file order."""
    return Dataset.from_dict({"user": [r[0] for r in rows], "item": [r[1] for r in rows],
                              "timestamp": [float(r[2]) for r in rows]})


def _decoded(histories, vocab):
    return {row["user"]: vocab.decode(row["items"]) for row in histories}


def test_histories_sort_stably_by_time_and_number_by_first_appearance():
    # User "b" has two events at t=5: they keep file order ("y" before "x").
    events = _events([("b", "y", 5), ("a", "x", 2), ("b", "x", 5), ("a", "z", 1), ("b", "w", 1), ("a", "y", 3)])
    histories, vocab = build_histories(events, min_history_length=1)
    assert histories["user"] == ["b", "a"]
    assert vocab.items == ["y", "x", "z", "w"]  # first appearance in the log
    assert _decoded(histories, vocab) == {"b": ["w", "y", "x"], "a": ["z", "x", "y"]}


def test_k_core_iterates_and_min_length_drops_short_users():
    # Item "c" occurs once; without it user 1 keeps one event, which then leaves item "b" with one event.
    events = _events([(0, "a", 0), (0, "b", 1), (1, "a", 0), (1, "c", 1), (2, "a", 0), (2, "b", 1), (2, "d", 2),
                      (3, "a", 0), (3, "d", 1)])
    histories, vocab = build_histories(events, k_core=2, min_history_length=1)
    assert _decoded(histories, vocab) == {"0": ["a", "b"], "2": ["a", "b", "d"], "3": ["a", "d"]}
    histories, vocab = build_histories(events, min_history_length=3)
    assert _decoded(histories, vocab) == {"2": ["a", "b", "d"]} and vocab.items == ["a", "b", "d"]


def test_filters_that_leave_nothing_say_which():
    events = _events([(0, "a", 0), (0, "b", 1), (1, "c", 0)])
    with pytest.raises(ValueError, match="min_history_length=3"):
        build_histories(events)
    with pytest.raises(ValueError, match="k_core=3"):
        build_histories(events, k_core=3)
    with pytest.raises(KeyError, match="no column 'timestamp'.*columns are"):
        build_histories(Dataset.from_dict({"user": ["a"], "item": ["b"]}))


def test_leave_one_out():
    histories = Dataset.from_dict({"user": ["a", "b", "c"], "items": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 1]]})
    splits = leave_one_out(histories)
    assert splits["train"]["items"] == [[1, 2, 3], [6, 7], [8]]  # "b" is too short to evaluate: trains on all
    assert splits["validation"][:] == {"user": ["a", "c"], "history": [[1, 2, 3], [8]], "target": [4, 9]}
    assert splits["test"][:] == {"user": ["a", "c"], "history": [[1, 2, 3, 4], [8, 9]], "target": [5, 1]}


def test_training_windows_recent_first_and_non_overlapping():
    train = Dataset.from_dict({"user": ["a", "b", "c", "d"], "items": [list(range(1, 11)), [11, 12], [13], [14, 15, 16, 17, 18]]})
    windows = training_windows(train, max_seq_length=3)  # windows of up to 4 items
    assert windows["input_ids"] == [
        [7, 8, 9, 10], [11, 12], [15, 16, 17, 18],  # every user's most recent window ("c" has no transition)
        [3, 4, 5, 6],  # then the next-older ones; [1, 2] of "a" follows, [14] of "d" is too short
        [1, 2],
    ]
    with pytest.raises(ValueError, match="max_seq_length"):
        training_windows(train, 0)


def test_training_windows_cover_every_item_once():
    rng = np.random.default_rng(0)
    items = [rng.integers(1, 50, size=n).tolist() for n in rng.integers(1, 40, size=30)]
    for max_seq_length in (1, 4, 50):
        windows = training_windows(Dataset.from_dict({"items": items}), max_seq_length)["input_ids"]
        assert all(2 <= len(w) <= max_seq_length + 1 for w in windows)
        lone_oldest = Counter(s[0] for s in items if len(s) % (max_seq_length + 1) == 1)  # too short to train on
        assert Counter(i for w in windows for i in w) == Counter(i for s in items for i in s) - lone_oldest
        assert sum(map(len, windows)) == sum(map(len, items)) - lone_oldest.total()


def test_vocabulary(tmp_path):
    vocab = ItemVocabulary(["x", "y", 7])
    assert vocab.n_items == 3 and vocab.encode(["y", "7"]) == [2, 3] and vocab.decode([3, 1]) == ["7", "x"]
    assert vocab.encode(["y", "new"], unknown="padding") == [2, 0]
    with pytest.raises(KeyError, match="not in the vocabulary"):
        vocab.encode(["new"])
    with pytest.raises(ValueError, match="outside 1..n_items=3"):
        vocab.decode([0])
    with pytest.raises(TypeError, match="integers"):
        vocab.decode([1.5])
    vocab.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "item_vocabulary.json").read_text()) == {"padding_id": 0, "items": ["x", "y", "7"]}
    assert ItemVocabulary.from_pretrained(tmp_path) == vocab
    with pytest.raises(ValueError, match="more than once"):
        ItemVocabulary(["a", "a"])


def test_synthetic_is_seeded_sized_and_structured():
    start = time.perf_counter()
    events = generate_synthetic_interactions(num_users=2000, num_items=500, max_history_length=60, seed=0)
    assert time.perf_counter() - start < 1.0
    assert events.column_names == ["user", "item", "timestamp"]
    assert events[:] == generate_synthetic_interactions(num_users=2000, num_items=500, max_history_length=60, seed=0)[:]
    assert events["item"] != generate_synthetic_interactions(seed=1)["item"]
    histories, vocab = build_histories(events)
    lengths = [len(h) for h in histories["items"]]
    assert len(lengths) == 2000 and min(lengths) >= 5 and max(lengths) == 60 and vocab.n_items == 500
    # Short-term structure: the most frequent successor of an item predicts the next item far better than
    # the most popular items do.
    successors: dict[int, Counter] = {}
    for items in histories["items"]:
        for a, b in zip(items, items[1:]):
            successors.setdefault(a, Counter())[b] += 1
    transitions = sum(sum(c.values()) for c in successors.values())
    bigram_hit = sum(c.most_common(1)[0][1] for c in successors.values()) / transitions
    popularity = Counter(i for items in histories["items"] for i in items)
    top10_share = sum(n for _, n in popularity.most_common(10)) / sum(popularity.values())
    assert bigram_hit > 0.5 and top10_share < 0.05
    long = generate_synthetic_interactions(num_users=3, num_items=50, max_history_length=100_000,
                                           min_history_length=100_000)
    assert len(long) == 300_000


def test_prepare_synthetic_save_and_load(tmp_path):
    data = prepare_data("synthetic", num_users=50, num_items=40, max_history_length=20)
    assert set(data.splits) == {"train", "validation", "test"} and data.vocab.n_items == 40
    assert data.info["users"] == 50 and data.info["evaluated_users"] == len(data.splits["test"]) == 50
    data.save(tmp_path / "prepared")
    assert sorted(os.listdir(tmp_path / "prepared")) == ["item_vocabulary.json", "prepared_data.json",
                                                          "test.parquet", "train.parquet", "validation.parquet"]
    loaded = prepare_data(str(tmp_path / "prepared"))
    assert loaded.vocab == data.vocab and loaded.info == data.info
    for name in ("train", "validation", "test"):
        assert loaded.splits[name][:] == data.splits[name][:]
    with pytest.raises(ValueError, match="prepared with"):
        prepare_data(str(tmp_path / "prepared"), k_core=5)
    assert PreparedData.load(tmp_path / "prepared").vocab == data.vocab


def test_without_the_datasets_library(tmp_path):
    """The GPU machine has no `datasets`: text formats and synthetic data still prepare, as ColumnTables, and the
    training and evaluation loaders batch them."""
    path = tmp_path / "seqs.txt"
    path.write_text("1 1 2 3 4\n2 2 3 4 5 6\n")
    code = f"""
import sys
sys.modules["datasets"] = None
from blossomrec_hf.data import ColumnTable, prepare_data, training_windows
data = prepare_data({str(path)!r})
assert isinstance(data.splits["train"], ColumnTable), type(data.splits["train"])
assert data.splits["test"][1] == {{"user": "2", "history": [2, 3, 4, 5], "target": 6}}, data.splits["test"][1]
assert data.splits["train"]["items"] == [[1, 2], [2, 3, 4]]
assert training_windows(data.splits["train"], 2)["input_ids"] == [[1, 2], [2, 3, 4]]
assert len(prepare_data("synthetic").splits["validation"]) == 2000
from blossomrec_hf.batching import EvaluationCollator, evaluation_dataloader, training_dataloader
windows = training_windows(data.splits["train"], 2)
batch = next(iter(training_dataloader(windows, 2, 4, 0, max_tokens_per_batch=10)))
assert batch["num_targets"] == 3 and batch["input_ids"].shape == (1, 5), batch
batch = next(iter(evaluation_dataloader(data.splits["test"], EvaluationCollator(3, exclude_history=True),
                                        max_seq_length=3, max_tokens=100, max_histories=4)))
assert batch["targets"].tolist() == [4, 6] and batch["input_ids"].tolist() == [[1, 2, 3, 3, 4, 5]], batch
assert batch["history_items"].tolist() == [[0, 1, 2, 3], [2, 3, 4, 5]], batch
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
