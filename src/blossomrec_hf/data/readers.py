"""Read interaction logs in the field's file formats into one Arrow table.

Every reader returns a ``pyarrow.Table`` with columns ``user`` and ``item`` (raw ids), and
``timestamp`` and ``rating`` where the source has them. Row order is file order; it is the
time order wherever the source has no timestamp, and breaks timestamp ties (stable sort).

Formats (``format=``, or detected from the name and first line):

- ``movielens``: MovieLens ``ratings.dat``, ``user::item::rating::timestamp``, latin-1.
- ``recbole``: RecBole atomic ``.inter``, TSV whose header names are ``name:type``.
- ``sequences``: ``user item item ...`` per line (S3Rec/ICLRec); also covers SASRec-style
  ``user item`` pairs, which are the same thing with one item per line.
- ``csv`` / ``tsv`` / ``parquet`` / ``json``: tables with a header; columns found by name.
- ``hub``: a Hugging Face Hub dataset, ``"hf://owner/name"`` (``split=`` picks the split).
  A ``datasets.Dataset``, a ``pyarrow.Table``, a pandas DataFrame or a dict of columns
  are read directly.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

__all__ = ["read_interactions", "detect_format", "FORMATS"]

FORMATS = ("movielens", "recbole", "sequences", "csv", "tsv", "parquet", "json", "hub")

# Column names the field uses, lower case, RecBole ":type" suffixes stripped. First match wins.
_USER_NAMES = ("user_id", "userid", "user", "uid", "reviewerid", "visitorid", "customer_id", "session_id")
_ITEM_NAMES = ("item_id", "itemid", "movieid", "movie_id", "item", "iid", "parent_asin", "asin",
               "product_id", "productid", "track_id", "business_id", "book_id")
_TIME_NAMES = ("timestamp", "time", "ts", "unixreviewtime", "datetime", "date", "created_at", "event_time")
_RATING_NAMES = ("rating", "score", "overall", "stars")


def _open_text(path: str, encoding: str = "utf-8"):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding=encoding)
    return open(path, encoding=encoding)


def _first_line(path: str) -> str:
    with _open_text(path, "latin-1") as f:
        for line in f:
            if line.strip():
                return line.rstrip("\r\n")
    return ""


def detect_format(source: Any) -> str:
    """Guess the format of ``source`` (a path or an in-memory table)."""
    if not isinstance(source, (str, os.PathLike)):
        return "table"
    path = os.fspath(source)
    if path.startswith("hf://"):
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
    if "::" in first:
        return "movielens"
    if ext == ".csv":
        return "csv"
    if ext == ".tsv":
        header = first.split("\t")
        return "recbole" if all(":" in h for h in header) else "tsv"
    return "sequences"


def read_interactions(
    source: Any,
    format: str | None = None,
    *,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
    rating_col: str | None = None,
    split: str = "train",
) -> pa.Table:
    """Read an interaction log; see the module docstring for formats and the returned columns.

    ``user_col`` etc. name the columns of tabular sources when the usual names do not match;
    ``time_col=""`` ignores any timestamp (file order is then the time order).
    """
    fmt = format or detect_format(source)
    if fmt not in FORMATS + ("table",):
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "sequences":
        return _read_sequences(os.fspath(source))
    if fmt == "movielens":
        table = _read_movielens(os.fspath(source))
    elif fmt == "recbole":
        table = _read_delimited(os.fspath(source), "\t", typed_header=True)
    elif fmt in ("csv", "tsv"):
        table = _read_delimited(os.fspath(source), "," if fmt == "csv" else "\t")
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(os.fspath(source))
    elif fmt == "json":
        table = _read_json(os.fspath(source))
    elif fmt == "hub":
        import datasets

        table = _to_table(datasets.load_dataset(os.fspath(source)[len("hf://"):], split=split))
    else:
        table = _to_table(source, split)
    return _select_columns(table, user_col, item_col, time_col, rating_col)


# ----------------------------------------------------------------------------- format readers


def _read_sequences(path: str) -> pa.Table:
    users: list[str] = []
    counts: list[int] = []
    items: list[str] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'user item [item ...]', got {line!r}")
            users.append(tokens[0])
            counts.append(len(tokens) - 1)
            items.extend(tokens[1:])
    user = np.repeat(np.array(users, dtype=object), counts)
    return pa.table({"user": _maybe_int(pa.array(user, pa.string())),
                     "item": _maybe_int(pa.array(items, pa.string()))})


def _read_movielens(path: str) -> pa.Table:
    # "u::i::r::t": read with ':' as the delimiter; the empty fields between the colons are dropped.
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(autogenerate_column_names=True, encoding="latin-1"),
        parse_options=pacsv.ParseOptions(delimiter=":"),
        convert_options=pacsv.ConvertOptions(column_types={"f0": pa.string(), "f2": pa.string()}),
    )
    if table.num_columns < 7:
        raise ValueError(f"{path}: expected 'user::item::rating::timestamp' lines")
    return pa.table({"user": table.column(0), "item": table.column(2),
                     "rating": table.column(4), "timestamp": table.column(6)})


def _read_delimited(path: str, delimiter: str, typed_header: bool = False) -> pa.Table:
    first = next(csv.reader([_first_line(path)], delimiter=delimiter))
    names = [h.split(":")[0] if typed_header else h for h in first]
    types = {}
    for raw, name in zip(first, names):
        kind = raw.split(":")[1].lower() if typed_header and ":" in raw else ""
        if kind.startswith("token"):
            types[name] = pa.string()
        elif kind.startswith("float"):
            types[name] = pa.float64()
    # Ids stay text until _maybe_int: "007" and "7" are different ids.
    for name in names:
        if _canon(name) in _USER_NAMES + _ITEM_NAMES:
            types[name] = pa.string()
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(column_types=types),
    )


def _read_json(path: str) -> pa.Table:
    import pyarrow.json as pajson

    try:
        return pajson.read_json(path)  # JSON lines
    except pa.ArrowInvalid:
        with _open_text(path) as f:
            rows = json.load(f)
        if isinstance(rows, dict):  # {"col": [...], ...}
            return pa.table(rows)
        return pa.Table.from_pylist(rows)


def _to_table(source: Any, split: str = "train") -> pa.Table:
    if isinstance(source, pa.Table):
        return source
    if isinstance(source, dict):
        if split in source and hasattr(source[split], "features"):  # a DatasetDict
            source = source[split]
        else:  # columns
            return pa.table(dict(source))
    if hasattr(source, "with_format") and hasattr(source, "features"):  # datasets.Dataset
        return source.with_format("arrow")[:]
    if type(source).__name__ == "DataFrame":
        return pa.Table.from_pandas(source, preserve_index=False)
    raise TypeError(f"cannot read interactions from {type(source).__name__}")


# ----------------------------------------------------------------------------- columns


def _canon(name: str) -> str:
    return name.split(":")[0].strip().lower()


def _find(table: pa.Table, wanted: str | None, candidates: tuple[str, ...], role: str, required: bool):
    if wanted is not None:
        if wanted == "":
            return None
        if wanted in table.column_names:
            return wanted
        raise KeyError(f"{role} column {wanted!r} not in {table.column_names}")
    by_canon = {_canon(n): n for n in reversed(table.column_names)}
    for cand in candidates:
        if cand in by_canon:
            return by_canon[cand]
    if required:
        raise KeyError(f"no {role} column among {table.column_names}; pass {role}_col=")
    return None


def _select_columns(table, user_col, item_col, time_col, rating_col) -> pa.Table:
    cols = {
        "user": _find(table, user_col, _USER_NAMES, "user", True),
        "item": _find(table, item_col, _ITEM_NAMES, "item", True),
        "timestamp": _find(table, time_col, _TIME_NAMES, "time", False),
        "rating": _find(table, rating_col, _RATING_NAMES, "rating", False),
    }
    out = {}
    for key, name in cols.items():
        if name is None:
            continue
        col = table.column(name)
        if key in ("user", "item"):
            col = _maybe_int(col if pa.types.is_string(col.type) or pa.types.is_integer(col.type)
                             else pc.cast(col, pa.string()))
        elif key == "timestamp":
            col = _time_to_number(col)
        out[key] = col
    return pa.table(out)


def _maybe_int(col):
    """Integer ids as int64 when the text round-trips ("12" yes, "012" no); else strings."""
    if pa.types.is_integer(col.type):
        return pc.cast(col, pa.int64())
    try:
        as_int = pc.cast(col, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return col
    if pc.all(pc.equal(pc.cast(as_int, pa.string()), col)).as_py() is False:
        return col
    return as_int


def _time_to_number(col):
    """Timestamps as int64 or float64, so they sort; datetimes and ISO strings become epoch units."""
    t = col.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return col
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return pc.cast(col, pa.float64())
        except pa.ArrowInvalid:
            col = pc.cast(col, pa.timestamp("us"))
            t = col.type
    if pa.types.is_date(t):
        col = pc.cast(col, pa.timestamp("s"))
        t = col.type
    if pa.types.is_timestamp(t):
        return pc.cast(col, pa.int64())
    raise TypeError(f"cannot use a {t} column as a timestamp")
