"""Readers: every format on small files the tests write, clear errors, and the real logs in ../shared/data."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from blossomrec_hf.data import build_histories, detect_format, load_interactions, prepare_data

# A log in file order: (user, item, rating, timestamp). User 7 has a tie at t=5 ("c" then "a") that keeps file
# order; the rows are not grouped by user; item "007" is not item "7".
ROWS = [
    ("10", "b", 5, 3), ("7", "c", 4, 5), ("10", "a", 1, 1), ("7", "a", 3, 5),
    ("10", "007", 2, 9), ("7", "b", 5, 2), ("10", "d", 4, 4), ("7", "7", 1, 8),
]
EXPECTED = {"10": ["a", "b", "d", "007"], "7": ["b", "c", "a", "7"]}


def _histories(events):
    histories, vocab = build_histories(events, min_history_length=1)
    return {row["user"]: vocab.decode(row["items"]) for row in histories}


def _write(path: Path, text: str, encoding="utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)


@pytest.fixture
def files(tmp_path):
    paths = {
        "ratings.dat": _write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ROWS),
                              "latin-1"),
        "x.inter": _write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                          + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS)),
        "x.csv": _write(tmp_path / "x.csv", '"userId","itemId","rating","timestamp"\n'
                        + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS)),
        "x.tsv": _write(tmp_path / "x.tsv", "user\titem\tts\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, r, t in ROWS)),
        "x.jsonl": _write(tmp_path / "x.jsonl", "".join(
            json.dumps({"user_id": u, "item_id": i, "timestamp": t}) + "\n" for u, i, r, t in ROWS)),
        "x.json": _write(tmp_path / "x.json", json.dumps(
            [{"user_id": u, "item_id": i, "timestamp": t} for u, i, r, t in ROWS])),
    }
    pq.write_table(pa.table({"user_id": [r[0] for r in ROWS], "item_id": [r[1] for r in ROWS],
                             "timestamp": [r[3] for r in ROWS]}), tmp_path / "x.parquet")
    paths["x.parquet"] = str(tmp_path / "x.parquet")
    with gzip.open(tmp_path / "x.csv.gz", "wt") as f:
        f.write(Path(paths["x.csv"]).read_text())
    paths["x.csv.gz"] = str(tmp_path / "x.csv.gz")
    return paths


@pytest.mark.parametrize("name,fmt", [("ratings.dat", "movielens"), ("x.inter", "recbole"), ("x.csv", "csv"),
                                      ("x.tsv", "tsv"), ("x.parquet", "parquet"), ("x.jsonl", "json"),
                                      ("x.json", "json"), ("x.csv.gz", "csv")])
def test_every_format_gives_the_same_histories(files, name, fmt):
    assert detect_format(files[name]) == fmt
    events = load_interactions(files[name])
    assert events.features["user"].dtype == events.features["item"].dtype == "string"
    assert events.features["timestamp"].dtype == "float64"
    assert _histories(events) == EXPECTED
    assert _histories(load_interactions(files[name], format=fmt)) == EXPECTED


def test_movielens_100k_u_data_is_not_mistaken_for_sequences(tmp_path):
    path = _write(tmp_path / "u.data", "196\t242\t3\t881250949\n196\t302\t4\t881250950\n22\t377\t1\t878887116\n")
    assert detect_format(path) == "movielens"
    events = load_interactions(path)
    assert events["item"] == ["242", "302", "377"] and events["rating"] == [3.0, 4.0, 1.0]


def test_ratings_are_read_where_present(files):
    assert load_interactions(files["ratings.dat"])["rating"] == [float(r[2]) for r in ROWS]
    assert load_interactions(files["x.inter"])["rating"] == [float(r[2]) for r in ROWS]
    assert "rating" not in load_interactions(files["x.tsv"]).column_names


def test_sequences_and_sasrec_pairs(tmp_path):
    sequences = _write(tmp_path / "s.txt", "1 5 3 9\n2 4\n\n3 1 2 3\n")
    pairs = _write(tmp_path / "p.txt", "1 5\n1 3\n2 4\n1 9\n3 1\n3 2\n3 3\n")
    want = {"1": ["5", "3", "9"], "2": ["4"], "3": ["1", "2", "3"]}
    assert detect_format(sequences) == detect_format(pairs) == "sequences"
    assert _histories(load_interactions(sequences)) == want
    assert _histories(load_interactions(pairs, format="sasrec_pairs")) == want
    assert load_interactions(pairs)["timestamp"] == [float(i) for i in range(7)]  # file order is time order
    with pytest.raises(ValueError, match=r"s.txt:1: expected 'user item'"):
        load_interactions(sequences, format="sasrec_pairs")


def test_in_memory_and_load_dataset_sources(tmp_path):
    columns = {"user_id": [r[0] for r in ROWS], "item_id": [r[1] for r in ROWS], "timestamp": [r[3] for r in ROWS]}
    assert _histories(load_interactions(Dataset.from_dict(columns))) == EXPECTED
    assert _histories(load_interactions(DatasetDict({"train": Dataset.from_dict(columns)}))) == EXPECTED
    assert _histories(load_interactions(columns)) == EXPECTED
    # A `load_dataset` path (a local dataset directory here; a Hub id takes the same route), also streamed.
    Dataset.from_dict(columns).to_parquet(str(tmp_path / "hubdir" / "train.parquet"))
    assert detect_format(str(tmp_path / "hubdir")) == "hub"
    assert _histories(load_interactions(str(tmp_path / "hubdir"))) == EXPECTED
    assert _histories(load_interactions(str(tmp_path / "hubdir"), streaming=True)) == EXPECTED


def test_columns_by_name_and_without_time(tmp_path):
    path = _write(tmp_path / "x.csv", "who,what,when\n1,5,2\n1,6,1\n")
    events = load_interactions(path, user_column="who", item_column="what", timestamp_column="when")
    assert _histories(events) == {"1": ["6", "5"]}
    events = load_interactions(path, user_column="who", item_column="what", timestamp_column="")
    assert _histories(events) == {"1": ["5", "6"]}  # file order
    with pytest.raises(KeyError, match=r"no user column .*columns are \['who', 'what', 'when'\]"):
        load_interactions(path)
    with pytest.raises(KeyError, match=r"no column 'whom' \(user_column\)"):
        load_interactions(path, user_column="whom", item_column="what")


def test_iso_dates_order_events(tmp_path):
    path = _write(tmp_path / "x.csv", "user,item,timestamp\nu,a,2020-01-03\nu,b,2020-01-01T10:00:00\nu,c,2020-01-02\n")
    assert _histories(load_interactions(path)) == {"u": ["b", "c", "a"]}
    columns = {"user": ["u", "u"], "item": ["a", "b"], "time": ["2021-05-02", "2021-05-01"]}
    assert _histories(load_interactions(columns)) == {"u": ["b", "a"]}


@pytest.mark.parametrize("name,text,message", [
    ("bad.dat", "1::2::3::4\n1::2::3\n", r"bad.dat:2: expected 'user::item::rating::timestamp'"),
    ("bad.csv", "user,item,timestamp\n1,2,3\n1,2\n", r"bad.csv:3: expected 3 fields"),
    ("time.csv", "user,item,timestamp\n1,2,3\n1,2,soon\n", r"time.csv:3: timestamp 'soon' is not a number"),
    ("rate.inter", "user_id:token\titem_id:token\trating:float\n1\t2\tgood\n", r"rate.inter:2: rating 'good'"),
    ("empty.csv", "", "the file is empty"),
    ("header.csv", "user,item\n", "no interactions"),
    ("bad.txt", "1 2 3\n4\n", r"bad.txt:2: expected 'user item \[item ...\]'"),
])
def test_malformed_files_name_the_line(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        load_interactions(_write(tmp_path / name, text))


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        load_interactions(str(tmp_path / "x"), format="xml")
    for fmt in ("csv", "auto"):
        with pytest.raises(FileNotFoundError, match="no such file"):
            load_interactions(str(tmp_path / "missing.csv"), format=fmt)


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.parametrize("name,users,items,interactions,longest", [
    ("ml-100k.inter", 943, 1682, 100_000, 737),
    ("Beauty.txt", 22_363, 12_101, 198_502, 204),
])
def test_shared_logs_match_their_readme(name, users, items, interactions, longest):
    if not (SHARED / name).exists():
        pytest.skip(f"{SHARED / name} is not present")
    data = prepare_data(str(SHARED / name))
    info = data.info
    assert (info["users"], info["items"], info["interactions"], info["max_history_length"]) == \
        (users, items, interactions, longest)
    if name == "Beauty.txt":  # ids already numbered 1..n by first appearance keep their numbers
        assert data.vocab.items == [str(i) for i in range(1, items + 1)]
        first = (SHARED / name).read_text().splitlines()[0].split()
        assert data.splits["test"][0] == {"user": first[0], "history": [int(i) for i in first[1:-1]],
                                          "target": int(first[-1])}


def test_movielens_ties_keep_file_order():
    """Against a plain-Python stable sort of ml-100k (about half of its events share a timestamp with another)."""
    path = SHARED / "ml-100k.inter"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    by_user: dict[str, list] = {}
    for line in path.read_text().splitlines()[1:]:
        user, item, _, timestamp = line.split("\t")
        by_user.setdefault(user, []).append((float(timestamp), item))
    expected = {u: [item for _, item in sorted(events, key=lambda e: e[0])] for u, events in by_user.items()}
    assert _histories(load_interactions(str(path))) == expected
