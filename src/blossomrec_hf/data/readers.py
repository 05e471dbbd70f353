"""Read interaction logs into events: columns ``user`` (string), ``item`` (string), ``timestamp`` (float64) and
``rating`` (float64, where the source has one).

Formats (``format="auto"`` picks one from the file name and first line):

- ``movielens``: MovieLens ``ratings.dat``, ``user::item::rating::timestamp``, latin-1; also MovieLens 100K's
  ``u.data``, the same four fields separated by tabs.
- ``recbole``: RecBole atomic ``.inter``, TSV whose header names carry types (``user_id:token``).
- ``sasrec_pairs``: ``user item`` per line, in time order.
- ``sequences``: ``user item item ...`` per line (S3Rec/ICLRec), items in time order.
- ``csv`` / ``tsv``: a header row; columns found by name (``user``/``user_id``/``userId``, ``item``/``item_id``/
  ``itemId``/``movieId``, ``timestamp``/``time``/``ts``, ...) or named by the ``*_column`` arguments.
- ``parquet`` / ``json`` (JSON lines or an array), and ``hub``: anything ``datasets.load_dataset`` opens (a Hub
  dataset id or a local dataset directory), with such columns; ``streaming=True`` streams them.

Where the source has no time, ``timestamp`` is the event's position in the file, so file order is time order. The
text formats are read without the ``datasets`` library; Parquet, JSON and Hub sources need it.
"""

from __future__ import annotations

import csv
import gzip
import os
from datetime import datetime

import numpy as np

from .tables import datasets, make_table

FORMATS = ("auto", "movielens", "recbole", "sasrec_pairs", "sequences", "csv", "tsv", "parquet", "json", "hub")

# Column names the field uses, compared in lower case with RecBole ":type" suffixes stripped. First match wins.
COLUMN_NAMES = {
    "user": ("user", "user_id", "userid", "uid", "reviewerid", "visitorid", "customer_id", "session_id"),
    "item": ("item", "item_id", "itemid", "movieid", "movie_id", "iid", "parent_asin", "asin", "product_id",
             "productid", "track_id", "business_id", "book_id"),
    "timestamp": ("timestamp", "time", "ts", "unixreviewtime", "datetime", "date", "created_at", "event_time"),
    "rating": ("rating", "score", "overall", "stars"),
}
REQUIRED = ("user", "item")


def load_interactions(source, *, format: str | None = "auto", user_column: str | None = None,
                      item_column: str | None = None, timestamp_column: str | None = None,
                      rating_column: str | None = None, split: str = "train", streaming: bool = False):
    """Events of an interaction log (see the module docstring). ``source``: a file path, a Hub dataset id or
    ``load_dataset`` path, or an in-memory ``datasets.Dataset`` / ``IterableDataset`` / ``DatasetDict`` / dict of
    columns. ``timestamp_column=""`` ignores the source's time column (file order then decides)."""
    format = format or "auto"
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    columns = {"user": user_column, "item": item_column, "timestamp": timestamp_column, "rating": rating_column}
    if not isinstance(source, (str, os.PathLike)):
        return _standardize(_in_memory(source, split), columns, type(source).__name__)
    path = os.fspath(source)
    if format == "auto":
        format = detect_format(path)
    if format in ("movielens", "recbole", "sasrec_pairs", "sequences", "csv", "tsv"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        if format in ("sasrec_pairs", "sequences"):
            return _read_whitespace(path, pairs=format == "sasrec_pairs")
        if format == "movielens":
            return _read_movielens(path)
        return _read_delimited(path, "," if format == "csv" else "\t", columns, typed_header=format == "recbole")
    if format == "hub" and not os.path.exists(path) and _looks_like_a_file(path):
        raise FileNotFoundError(f"{path}: no such file (and not a Hub dataset id)")
    if datasets is None:
        raise ImportError(f"reading {format} sources needs the `datasets` library (pip install datasets)")
    if format in ("parquet", "json"):
        dataset = datasets.load_dataset(format, data_files=path, split="train", streaming=streaming)
    else:
        dataset = datasets.load_dataset(path, split=split, streaming=streaming)
    return _standardize(dataset, columns, path)


def detect_format(path: str) -> str:
    """The reader for a path: by extension, then by the first line; anything not a local file is ``hub``."""
    if not os.path.isfile(path):
        return "hub"
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    if ext in (".parquet", ".pq"):
        return "parquet"
    if ext in (".json", ".jsonl", ".ndjson"):
        return "json"
    if ext == ".inter":
        return "recbole"
    first = _first_line(path)
    if "::" in first or _is_tab_separated_rating(first):
        return "movielens"
    if ext == ".csv":
        return "csv"
    if ext == ".tsv":
        return "recbole" if all(":" in name for name in first.split("\t")) else "tsv"
    return "sequences"


def _is_tab_separated_rating(line: str) -> bool:
    """MovieLens 100K ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``, all numbers (sequences use spaces)."""
    fields = line.split("\t")
    return len(fields) == 4 and all(field.strip().replace(".", "", 1).isdigit() for field in fields)


def _looks_like_a_file(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return path.startswith((".", "/", "~")) or os.path.splitext(name)[1].lower() in (
        ".csv", ".tsv", ".txt", ".dat", ".inter", ".parquet", ".pq", ".json", ".jsonl", ".ndjson")


# ----------------------------------------------------------------------------- text formats


def _open(path: str, encoding: str = "utf-8"):
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding=encoding, newline="")


def _first_line(path: str) -> str:
    with _open(path, "latin-1") as f:
        for line in f:
            if line.strip():
                return line.rstrip("\r\n")
    return ""


def _events(path: str, user: list, item: list, timestamp=None, rating=None):
    if not user:
        raise ValueError(f"{path}: no interactions in the file")
    columns = {"user": np.array(user, dtype=object), "item": np.array(item, dtype=object),
               "timestamp": np.arange(len(user), dtype=np.float64) if timestamp is None else timestamp}
    if rating is not None:
        columns["rating"] = rating
    return make_table(columns)


def _read_whitespace(path: str, pairs: bool):
    user, item = [], []
    expected = "'user item'" if pairs else "'user item [item ...]'"
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 2 or (pairs and len(tokens) != 2):
                raise ValueError(f"{path}:{lineno}: expected {expected}, got {line.strip()[:80]!r}")
            user.extend([tokens[0]] * (len(tokens) - 1))
            item.extend(tokens[1:])
    return _events(path, user, item)


def _read_movielens(path: str):
    user, item, rating, timestamp = [], [], [], []
    with _open(path, "latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.strip().split("::") if "::" in line else line.split()
            if len(fields) != 4:
                raise ValueError(f"{path}:{lineno}: expected 'user::item::rating::timestamp' (or the same four "
                                 f"fields separated by tabs), got {line.strip()[:80]!r}")
            user.append(fields[0])
            item.append(fields[1])
            rating.append(fields[2])
            timestamp.append(fields[3])
    return _events(path, user, item, _numbers(timestamp, path, "timestamp", 1), _numbers(rating, path, "rating", 1))


def _read_delimited(path: str, delimiter: str, wanted: dict, typed_header: bool):
    with _open(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty")
        names = [h.split(":")[0] if typed_header else h for h in header]
        found = _resolve_columns(names, wanted, path)
        index = {role: names.index(name) for role, name in found.items()}
        values: dict[str, list] = {role: [] for role in index}
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != len(names):
                raise ValueError(f"{path}:{lineno}: expected {len(names)} fields ({delimiter!r}-separated), "
                                 f"got {len(row)}")
            for role, i in index.items():
                values[role].append(row[i])
    timestamp = _numbers(values["timestamp"], path, "timestamp", 2) if "timestamp" in values else None
    rating = _numbers(values["rating"], path, "rating", 2) if "rating" in values else None
    return _events(path, values["user"], values["item"], timestamp, rating)


def _numbers(values: list, path: str, what: str, first_lineno: int) -> np.ndarray:
    """float64 of text values; timestamps may also be ISO dates (seconds since the epoch)."""
    try:
        return np.array(values, dtype=np.float64)
    except ValueError:
        pass
    out = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        try:
            out[i] = float(value)
        except ValueError:
            try:
                if what != "timestamp":
                    raise
                out[i] = datetime.fromisoformat(value.strip()).timestamp()
            except ValueError:
                raise ValueError(f"{path}:{first_lineno + i}: {what} {value!r} is not a number"
                                 f"{' or an ISO date' if what == 'timestamp' else ''}") from None
    return out


# ----------------------------------------------------------------------------- datasets-backed sources


def _in_memory(source, split: str):
    if datasets is None:
        raise ImportError("reading an in-memory table needs the `datasets` library (pip install datasets)")
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise KeyError(f"the dataset has no split {split!r}; its splits are {list(source)}")
        return source[split]
    if isinstance(source, dict):
        return datasets.Dataset.from_dict(source)
    if type(source).__name__ == "DataFrame":
        return datasets.Dataset.from_pandas(source, preserve_index=False)
    raise TypeError(f"cannot read interactions from a {type(source).__name__}")


def _canonical(name: str) -> str:
    return name.split(":")[0].strip().lower()


def _resolve_columns(names: list[str], wanted: dict, where: str) -> dict:
    """Role -> column name, from explicit names or the usual ones; missing required columns are an error."""
    found = {}
    by_canonical = {}
    for name in names:
        by_canonical.setdefault(_canonical(name), name)
    for role, candidates in COLUMN_NAMES.items():
        name = wanted.get(role)
        if name == "":
            continue
        if name is not None:
            if name not in names:
                raise KeyError(f"{where} has no column {name!r} ({role}_column); its columns are {names}")
            found[role] = name
            continue
        for candidate in candidates:
            if candidate in by_canonical:
                found[role] = by_canonical[candidate]
                break
        else:
            if role in REQUIRED:
                raise KeyError(f"{where} has no {role} column (looked for {', '.join(candidates[:4])}, ...); its "
                               f"columns are {names}; name it with {role}_column=")
    return found


def _standardize(dataset, wanted: dict, where: str):
    """A loaded dataset's columns renamed and typed as events; a missing time becomes the row index."""
    names = list(dataset.column_names or next(iter(dataset)).keys())
    found = _resolve_columns(names, wanted, where)

    def convert(batch, indices):
        out = {"user": [str(v) for v in batch[found["user"]]], "item": [str(v) for v in batch[found["item"]]]}
        for role in ("user", "item"):
            if any(v is None for v in batch[found[role]]):
                raise ValueError(f"{where}: an event has no {role} (row {indices[0]} or after)")
        if "timestamp" in found:
            out["timestamp"] = [_time_value(v, where) for v in batch[found["timestamp"]]]
        else:
            out["timestamp"] = [float(i) for i in indices]
        if "rating" in found:
            out["rating"] = [float(v) for v in batch[found["rating"]]]
        return out

    features = {"user": "string", "item": "string", "timestamp": "float64"}
    if "rating" in found:
        features["rating"] = "float64"
    features = datasets.Features({k: datasets.Value(v) for k, v in features.items()})
    return dataset.map(convert, batched=True, with_indices=True, remove_columns=names, features=features)


def _time_value(value, where: str) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if hasattr(value, "isoformat") and not isinstance(value, (int, float)):  # a date
        return datetime.fromisoformat(value.isoformat()).timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        try:
            return datetime.fromisoformat(str(value).strip()).timestamp()
        except ValueError:
            raise ValueError(f"{where}: timestamp {value!r} is not a number or an ISO date") from None
