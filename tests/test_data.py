"""The interaction-log data layer: readers, sequences, leave-one-out, torch datasets."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from blossomrec_hf.data import (
    IGNORE_INDEX,
    SequenceData,
    detect_format,
    eval_dataset,
    load_sequences,
    read_interactions,
    sample_negatives,
    train_dataset,
)

# A small log in file order: (user, item, rating, timestamp). User "u2" has a timestamp tie
# (items "c" then "a" at t=5) that must keep file order; rows are not grouped by user.
ROWS = [
    ("10", "b", 5, 3), ("7", "c", 4, 5), ("10", "a", 1, 1), ("7", "a", 3, 5),
    ("10", "c", 2, 9), ("7", "b", 5, 2), ("10", "d", 4, 4), ("7", "d", 1, 8),
]
# Expected time order per raw user; users sort as ints (7 < 10), items as text.
EXPECTED = {7: ["b", "c", "a", "d"], 10: ["a", "b", "d", "c"]}


def _check(data: SequenceData, expected=EXPECTED):
    assert list(data.user_vocab) == sorted(expected)
    got = {u: list(data.decode_items(data[i])) for i, u in enumerate(data.user_vocab)}
    assert got == {u: list(v) for u, v in expected.items()}
    assert data.items.min() >= 1 and data.items.max() == data.n_items


def _write(path: Path, text: str, encoding="utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)


@pytest.fixture
def files(tmp_path):
    out = {}
    out["ratings.dat"] = _write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ROWS),
                                "latin-1")
    out["x.inter"] = _write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                            + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS))
    out["x.csv"] = _write(tmp_path / "x.csv", '"userId","movieId","rating","timestamp"\n'
                          + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS))
    out["x.tsv"] = _write(tmp_path / "x.tsv", "user\titem\ttime\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, r, t in ROWS))
    cols = {"user_id": [r[0] for r in ROWS], "item_id": [r[1] for r in ROWS],
            "rating": [r[2] for r in ROWS], "timestamp": [r[3] for r in ROWS]}
    pq.write_table(pa.table(cols), tmp_path / "x.parquet")
    out["x.parquet"] = str(tmp_path / "x.parquet")
    out["x.jsonl"] = _write(tmp_path / "x.jsonl", "".join(
        json.dumps({"user_id": u, "item_id": i, "timestamp": t}) + "\n" for u, i, r, t in ROWS))
    out["x.json"] = _write(tmp_path / "x.json", json.dumps(
        [{"user_id": u, "item_id": i, "timestamp": t} for u, i, r, t in ROWS]))
    with gzip.open(tmp_path / "x.csv.gz", "wt") as f:
        f.write(Path(out["x.csv"]).read_text())
    out["x.csv.gz"] = str(tmp_path / "x.csv.gz")
    return out, cols


@pytest.mark.parametrize("name", ["ratings.dat", "x.inter", "x.csv", "x.tsv", "x.parquet", "x.jsonl", "x.json",
                                  "x.csv.gz"])
def test_file_formats_agree(files, name):
    paths, _ = files
    _check(load_sequences(paths[name]))


def test_detect_format(files):
    paths, _ = files
    assert [detect_format(paths[n]) for n in ["ratings.dat", "x.inter", "x.csv", "x.tsv", "x.parquet", "x.jsonl"]] \
        == ["movielens", "recbole", "csv", "tsv", "parquet", "json"]
    assert detect_format("hf://owner/name") == "hub"


def test_in_memory_sources(files):
    _, cols = files
    import datasets

    _check(load_sequences(cols))
    _check(load_sequences(pa.table(cols)))
    _check(load_sequences(datasets.Dataset.from_dict(cols)))
    _check(load_sequences(datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols)})))
    pd = pytest.importorskip("pandas")
    _check(load_sequences(pd.DataFrame(cols)))


def test_sequences_and_pairs_text(tmp_path):
    seqs = _write(tmp_path / "s.txt", "1 5 3 9\n2 4\n3 1 2 3\n")
    pairs = _write(tmp_path / "p.txt", "1 5\n1 3\n2 4\n1 9\n3 1\n3 2\n3 3\n")
    for path in (seqs, pairs):
        assert detect_format(path) == "sequences"
        d = load_sequences(path)
        assert [list(d.decode_items(d[u])) for u in range(3)] == [[5, 3, 9], [4], [1, 2, 3]]
    # Ids are ranks of the raw ids: 6, 7, 8 never occur, so raw 9 is id 6.
    d = load_sequences(seqs)
    assert list(d[0]) == [5, 3, 6] and d.n_items == 6


def test_ids_keep_leading_zeros(tmp_path):
    path = _write(tmp_path / "x.csv", "user_id,item_id,timestamp\n1,007,1\n1,7,2\n1,0205616461,3\n")
    d = load_sequences(path)
    assert list(d.decode_items(d[0])) == ["007", "7", "0205616461"]
    assert list(d.encode_items(["7", "nope"])) == [d[0][1], 0]


def test_column_override_and_no_timestamp(tmp_path):
    path = _write(tmp_path / "x.csv", "who,what,when\n1,5,2\n1,6,1\n")
    d = load_sequences(path, user_col="who", item_col="what", time_col="when")
    assert list(d.decode_items(d[0])) == [6, 5]
    d = load_sequences(path, user_col="who", item_col="what", time_col="")  # file order
    assert list(d.decode_items(d[0])) == [5, 6]
    with pytest.raises(KeyError):
        read_interactions(path)


def test_datetime_timestamps():
    table = {"user_id": [1, 1, 1], "item_id": [1, 2, 3],
             "timestamp": ["2020-01-03T00:00:00", "2020-01-01T00:00:00", "2020-01-02T00:00:00"]}
    d = load_sequences(table)
    assert list(d.decode_items(d[0])) == [2, 3, 1]


def test_min_rating_and_k_core(files):
    paths, _ = files
    d = load_sequences(paths["x.inter"], min_rating=3)
    assert {u: list(d.decode_items(d[i])) for i, u in enumerate(d.user_vocab)} == \
        {7: ["b", "c", "a"], 10: ["b", "d"]}
    # 2-core after rating >= 3: item "c" and "a" occur once, then user 10 keeps 2 items ("b", "d"),
    # user 7 keeps "b" only -> dropped -> "b" and "d" occur once -> everything goes.
    assert load_sequences(paths["x.inter"], min_rating=3, k_core=2).stats()["interactions"] == 0
    core = load_sequences(paths["x.inter"], k_core=2)
    _check(core)


def test_k_core_iterates():
    # Item 3 occurs once; dropping it leaves user 1 with one item, which then drops item 2's count.
    table = {"user": [0, 0, 1, 1, 2, 2, 2], "item": [1, 2, 1, 3, 1, 2, 4], "timestamp": list(range(7))}
    d = SequenceData.from_interactions(read_interactions(table), k_core=2)
    assert list(d.user_vocab) == [0, 2] and list(d.item_vocab) == [1, 2]
    assert [list(d.decode_items(d[u])) for u in range(2)] == [[1, 2], [1, 2]]


def test_leave_one_out():
    d = SequenceData.from_lists([[1, 2, 3, 4, 5], [6, 7], [8, 9, 1]])
    assert list(d.eval_users()) == [0, 2]
    assert list(d.train_ends(2)) == [3, 7, 8]  # user 1 is too short: trains on everything
    users, end = d.eval_ends("valid")
    assert list(d.items[end]) == [4, 9]
    users, end = d.eval_ends("test")
    assert list(d.items[end]) == [5, 1]
    row, item = d.seen_items(users, "test")
    assert list(row) == [0, 0, 0, 0, 1, 1] and list(item) == [1, 2, 3, 4, 8, 9]
    row, item = d.seen_items(torch.tensor([2]), "valid")
    assert list(row) == [0] and list(item) == [8]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_train_windows(padding_side):
    d = SequenceData.from_lists([[1, 2, 3, 4, 5, 6, 7], [8, 9], [3]])
    ds = train_dataset(d, max_len=3, padding_side=padding_side)
    x, y = ds.tensors["item_ids"], ds.tensors["labels"]
    assert x.dtype == y.dtype == torch.long and x.shape == (2, 3)  # user 2 has no transition
    if padding_side == "left":
        assert x.tolist() == [[2, 3, 4], [0, 0, 8]]
        assert y.tolist() == [[3, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, 9]]
    else:
        assert x.tolist() == [[2, 3, 4], [8, 9, 0]]  # 9 is an input without a target
        assert y.tolist() == [[3, 4, 5], [9, IGNORE_INDEX, IGNORE_INDEX]]
    assert train_dataset(d, 3, holdout=0).tensors["labels"][0].tolist() == [5, 6, 7]
    assert train_dataset(d, 3, holdout=1).tensors["labels"][0].tolist() == [4, 5, 6]


def test_all_windows_cover_each_transition_once():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 20, size=n)) for n in [1, 2, 3, 4, 5, 9, 10, 11, 12, 30]]
    d = SequenceData.from_lists(seqs)
    for max_len in (1, 3, 4, 50):
        ds = train_dataset(d, max_len, windows="all")
        x, y = ds.tensors["item_ids"], ds.tensors["labels"]
        got = sorted((a, b) for a, b in zip(x.flatten().tolist(), y.flatten().tolist()) if b != IGNORE_INDEX)
        ends = d.train_ends(2)
        want = sorted((int(d.items[j]), int(d.items[j + 1])) for u in range(d.n_users)
                      for j in range(d.offsets[u], ends[u] - 1))
        assert got == want
        assert ((x == 0) == (y == IGNORE_INDEX)).all()  # left padding: labels only under real inputs


def test_eval_dataset_and_negatives():
    d = SequenceData.from_lists([[1, 2, 3, 4, 5], [6, 7], [8, 9, 1, 2, 3, 4, 5]] + [[10 + i] for i in range(200)])
    va = eval_dataset(d, "valid", max_len=3)
    te = eval_dataset(d, "test", max_len=3, negatives=100, seed=1)
    assert va.tensors["item_ids"].tolist() == [[1, 2, 3], [1, 2, 3]]
    assert va.tensors["target"].tolist() == [4, 4] and va.tensors["user"].tolist() == [0, 2]
    assert te.tensors["item_ids"].tolist() == [[2, 3, 4], [2, 3, 4]] and te.tensors["target"].tolist() == [5, 5]
    neg = te.tensors["negatives"]
    assert neg.shape == (2, 100)
    for row, u in zip(neg.tolist(), [0, 2]):
        assert len(set(row)) == 100 and not set(row) & set(d[u].tolist()) and min(row) >= 1
        assert max(row) <= d.n_items
    assert torch.equal(neg, eval_dataset(d, "test", 3, negatives=100, seed=1).tensors["negatives"])
    assert not torch.equal(neg, torch.from_numpy(sample_negatives(d, np.array([0, 2]), 100, seed=2)))


def test_batching():
    d = SequenceData.from_lists([[i, i + 1, i + 2, i + 3] for i in range(1, 11)])
    ds = train_dataset(d, max_len=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    first = next(iter(loader))
    assert set(first) == {"item_ids", "labels"} and first["item_ids"].shape == (4, 4)
    batches = list(ds.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b["item_ids"]) for b in batches] == [4, 4, 2]
    got = torch.cat([b["item_ids"] for b in batches])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, ds.tensors["item_ids"].tolist()))
    assert len(list(ds.batches(4, drop_last=True))) == 2
    from transformers import default_data_collator

    assert default_data_collator([ds[0], ds[1]])["labels"].shape == (2, 4)


def test_save_load(tmp_path, files):
    paths, _ = files
    d = load_sequences(paths["x.csv"])
    d.save(tmp_path / "saved")
    e = load_sequences(tmp_path / "saved")
    assert np.array_equal(d.offsets, e.offsets) and np.array_equal(d.items, e.items)
    assert list(e.user_vocab) == list(d.user_vocab) and list(e.item_vocab) == list(d.item_vocab)
    assert json.loads((tmp_path / "saved" / "stats.json").read_text()) == d.stats()


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.mark.parametrize("name,stats", [
    ("ml-100k.inter", (943, 1682, 100_000, 737)),
    ("Beauty.txt", (22_363, 12_101, 198_502, 204)),
])
def test_shared_datasets(name, stats):
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    s = load_sequences(path).stats()
    assert (s["users"], s["items"], s["interactions"], s["max_length"]) == stats
