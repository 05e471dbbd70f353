"""Read interaction logs into events: columns ``user`` (string), ``item`` (string), ``timestamp`` (float64) and
``rating`` (float64, where the source has one).

Formats (``format="auto"`` picks one from the file name and first line):

- ``movielens``: MovieLens ``ratings.dat``, ``user::item::rating::timestamp``, latin-1; also MovieLens 100K's
  ``u.data``, the same four fields separated by tabs.
- ``recbole``: RecBole atomic ``.inter``, TSV whose header names carry types (``user_id:token``).
- ``sasrec_pairs``: ``user item`` per line, in time order.
- ``sequences``: ``user item item ...`` per line (S3Rec/ICLRec), items in time order. A ``.txt`` (or other) file
  that no other rule matches is read this way, which also reads ``sasrec_pairs`` files right.

  Both are whitespace-separated tokens, so user and item ids cannot contain spaces: ``u1 red shoe`` is user ``u1``
  with items ``red`` and ``shoe``. Where that is detectable it is an error: a ``sasrec_pairs`` line with other than
  2 fields, or, in a detected file, users spread over several lines (a pairs layout) with some line of 3 or more
  fields; pass the format explicitly to read such a file as ``sequences`` anyway.
- ``csv`` / ``tsv``: a header row; columns found by name (``user``/``user_id``/``userId``, ``item``/``item_id``/
  ``itemId``/``movieId``, ``timestamp``/``time``/``ts``, ...) or named by the ``*_column`` arguments.
- ``parquet`` / ``json`` (JSON lines or an array), and ``hub``: anything ``datasets.load_dataset`` opens (a Hub
  dataset id or a local dataset directory), with such columns; ``streaming=True`` streams them.

Where the source has no time, ``timestamp`` is the event's position in the file, so file order is time order. The
text formats are read without the ``datasets`` library; Parquet, JSON and Hub sources need it. Text files must be
UTF-8 (MovieLens ``.dat`` files: latin-1).

Bad input is a one-line error that names the file and line (text formats) or the column and row (``row`` counts
from 0): text that is not UTF-8, a line with the wrong number of fields, an empty, null, NaN or nested (list, dict)
user or item id, a timestamp that is not a number or a date. Lines repeated exactly (text logs without time) are
kept, with a ``DataWarning`` that counts them; ``build_histories`` does the same for events with the same user,
item and timestamp.
"""

from __future__ import annotations

import array
import csv
import gzip
import math
import os
import warnings
from datetime import datetime

import numpy as np

from .errors import DataWarning, MissingDependencyError
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
    detected = format == "auto"
    if detected:
        format = detect_format(path)
    if format in ("movielens", "recbole", "sasrec_pairs", "sequences", "csv", "tsv"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        if format in ("sasrec_pairs", "sequences"):
            return _read_whitespace(path, pairs=format == "sasrec_pairs", detected=detected)
        if format == "movielens":
            return _read_movielens(path)
        return _read_delimited(path, "," if format == "csv" else "\t", columns, typed_header=format == "recbole")
    if format == "hub" and not os.path.exists(path) and _looks_like_a_file(path):
        raise FileNotFoundError(f"{path}: no such file (and not a Hub dataset id)")
    if datasets is None:
        raise MissingDependencyError(f"reading {format} sources needs the `datasets` library (pip install datasets)")
    if format in ("parquet", "json"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        _check_not_empty(path, format)
        dataset = _load_dataset(path, f"{path}: cannot read it as {format}", format, data_files=path, split="train",
                                streaming=streaming)
    else:
        what = f"{path!r} is not a local file or folder, nor a Hub dataset that can be loaded" \
            if not os.path.exists(path) else f"{path}: cannot load it with datasets.load_dataset"
        dataset = _load_dataset(path, what, path, split=split, streaming=streaming)
    return _standardize(dataset, columns, path)


def _check_not_empty(path: str, format: str) -> None:
    """An empty Parquet or JSON file is a clear error here (``load_dataset`` fails on it with an unrelated one)."""
    if format == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{path}: not a readable Parquet file ({_one_line(error)})") from None
        if rows == 0:
            raise ValueError(f"{path}: no interactions in the file (the Parquet table has no rows)")
    elif format == "json":
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return
        raise ValueError(f"{path}: no interactions in the file (it is empty)")


def _load_dataset(path: str, what: str, *args, **kwargs):
    """``datasets.load_dataset`` with its errors as one-line ``FileNotFoundError`` / ``ValueError``: no dataset or
    no connection to the Hub (``what``, then the cause), or a file that does not parse."""
    from datasets.exceptions import DatasetNotFoundError, DatasetsError

    try:
        dataset = datasets.load_dataset(*args, **kwargs)
    except (DatasetNotFoundError, ConnectionError) as error:
        raise FileNotFoundError(f"{what}: {_one_line(error)}") from error
    except (DatasetsError, StopIteration, ValueError) as error:
        cause = error.__cause__ or error.__context__
        detail = _one_line(error) + (f" ({type(cause).__name__}: {_one_line(cause)})" if cause is not None else "")
        raise ValueError(f"{what}: {detail or type(error).__name__}") from error
    return dataset


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


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


def _read_whitespace(path: str, pairs: bool, detected: bool = False):
    """``user item`` (``pairs``) or ``user item item ...`` lines: whitespace-separated tokens, so ids cannot contain
    spaces. ``detected``: the format was guessed, so a file laid out as pairs (users on several lines) whose lines
    have 3 or more fields is ambiguous (ids with spaces?) and an error."""
    user, item = [], []
    expected = "'user item'" if pairs else "'user item [item ...]'"
    line_numbers, line_hashes, line_users = array.array("q"), array.array("q"), []
    long_line = None  # (line number, fields) of the first line of 3 or more fields
    try:
        with _open(path) as f:
            for lineno, line in enumerate(f, 1):
                tokens = line.split()
                if not tokens:
                    continue
                if len(tokens) < 2 or (pairs and len(tokens) != 2):
                    raise ValueError(f"{path}:{lineno}: expected {expected} (whitespace-separated; ids cannot "
                                     f"contain spaces), got {len(tokens)} field(s): {line.strip()[:80]!r}")
                if long_line is None and len(tokens) > 2:
                    long_line = (lineno, len(tokens))
                line_numbers.append(lineno)
                line_hashes.append(hash(tuple(tokens)))
                line_users.append(tokens[0])
                user.extend([tokens[0]] * (len(tokens) - 1))
                item.extend(tokens[1:])
    except UnicodeDecodeError as error:
        raise _utf8_error(path, error) from None
    hashes = np.frombuffer(line_hashes, dtype=np.int64)
    if detected and long_line is not None:
        _check_one_line_per_user(path, np.asarray(line_users, dtype=object), hashes, long_line)
    _warn_repeated_lines(path, hashes, np.frombuffer(line_numbers, dtype=np.int64))
    return _events(path, user, item)


def _check_one_line_per_user(path: str, users: np.ndarray, hashes: np.ndarray, long_line: tuple) -> None:
    """A detected whitespace file with lines of 3+ fields is read as ``sequences``, one line per user; a user on
    several different lines means a ``user item`` pairs layout, where 3 fields can only be an id with spaces."""
    user_codes = np.unique(users.astype(str), return_inverse=True)[1].reshape(-1)
    if user_codes.max() + 1 == len(users):
        return
    distinct = np.unique(np.stack([user_codes, hashes]), axis=1)[0]  # one entry per (user, distinct line)
    spread = np.flatnonzero(np.bincount(distinct) > 1)
    if len(spread):
        example = users[np.flatnonzero(user_codes == spread[0])[0]]
        lineno, fields = long_line
        raise ValueError(
            f"{path}:{lineno}: {fields} fields, but {len(spread)} user(s) (e.g. {example!r}) are on several lines, as "
            f"in a 'user item' pairs file: an item id with spaces? Fields are whitespace-separated, so ids cannot "
            f"contain spaces; if every line is 'user item item ...', pass the format sequences explicitly")


def _warn_repeated_lines(path: str, hashes: np.ndarray, line_numbers: np.ndarray) -> None:
    """A ``DataWarning`` counting lines that repeat an earlier line exactly (they are kept)."""
    if len(hashes) < 2:
        return
    first = np.unique(hashes, return_index=True)[1]
    if len(first) == len(hashes):
        return
    repeated = np.ones(len(hashes), dtype=bool)
    repeated[first] = False
    count = int(repeated.sum())
    warnings.warn(f"{path}: {count} line(s) repeat an earlier line exactly (first at line "
                  f"{int(line_numbers[np.flatnonzero(repeated)[0]])}); kept as repeated interactions",
                  DataWarning, stacklevel=3)


def _utf8_error(path: str, error: UnicodeDecodeError) -> ValueError:
    """The error for a text file that is not UTF-8, naming the first bad line (found by reading it again as bytes;
    a UTF-8 multi-byte character never contains a newline byte, so lines can be decoded one by one)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{line[bad.start]:02x} at byte "
                                  f"{bad.start + 1} of the line); convert the file to UTF-8, e.g. with "
                                  f"iconv -f latin1 -t utf-8")
    return ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})")


def _read_movielens(path: str):
    user, item, rating, timestamp = [], [], [], []
    line_numbers = array.array("q")
    with _open(path, "latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.strip().split("::") if "::" in line else line.split()
            if len(fields) != 4:
                raise ValueError(f"{path}:{lineno}: expected 'user::item::rating::timestamp' (or the same four "
                                 f"fields separated by tabs), got {line.strip()[:80]!r}")
            if not (fields[0].strip() and fields[1].strip()):
                raise ValueError(f"{path}:{lineno}: the {'user' if not fields[0].strip() else 'item'} id is empty")
            user.append(fields[0])
            item.append(fields[1])
            rating.append(fields[2])
            timestamp.append(fields[3])
            line_numbers.append(lineno)
    line_numbers = np.frombuffer(line_numbers, dtype=np.int64)
    return _events(path, user, item, _numbers(timestamp, path, "timestamp", line_numbers),
                   _numbers(rating, path, "rating", line_numbers))


def _read_delimited(path: str, delimiter: str, wanted: dict, typed_header: bool):
    try:
        with _open(path) as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: the file is empty")
            names = [h.split(":")[0] if typed_header else h for h in header]
            found = _resolve_columns(names, wanted, path)
            index = {role: names.index(name) for role, name in found.items()}
            ids = [(role, index[role], found[role]) for role in REQUIRED]
            values: dict[str, list] = {role: [] for role in index}
            timeless = "timestamp" not in index
            line_numbers, line_hashes = array.array("q"), array.array("q")
            for row in reader:
                lineno = reader.line_num
                if not row:
                    continue
                if len(row) != len(names):
                    raise ValueError(f"{path}:{lineno}: expected {len(names)} fields ({delimiter!r}-separated), "
                                     f"got {len(row)}")
                for role, i, name in ids:
                    if not row[i].strip():
                        raise ValueError(f"{path}:{lineno}: the {role} id (column {name!r}) is empty")
                for role, i in index.items():
                    values[role].append(row[i])
                line_numbers.append(lineno)
                if timeless:
                    line_hashes.append(hash(tuple(row)))
    except UnicodeDecodeError as error:
        raise _utf8_error(path, error) from None
    line_numbers = np.frombuffer(line_numbers, dtype=np.int64)
    if timeless:
        _warn_repeated_lines(path, np.frombuffer(line_hashes, dtype=np.int64), line_numbers)
    timestamp = _numbers(values["timestamp"], path, "timestamp", line_numbers) if "timestamp" in values else None
    rating = _numbers(values["rating"], path, "rating", line_numbers) if "rating" in values else None
    return _events(path, values["user"], values["item"], timestamp, rating)


def _numbers(values: list, path: str, what: str, line_numbers) -> np.ndarray:
    """float64 of text values; timestamps may also be ISO dates (seconds since the epoch). ``line_numbers``: the
    line of each value, or the line of the first when every line has a value."""
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
                lineno = line_numbers + i if isinstance(line_numbers, int) else int(line_numbers[i])
                raise ValueError(f"{path}:{lineno}: {what} {value!r} is not a number"
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
    """A loaded dataset's columns renamed and typed as events; a missing time becomes the row index. A user or item
    id that is missing (null, NaN, empty) or nested (list, dict), or a time that is not one, is an error naming the
    column and the row (counted from 0)."""
    names = dataset.column_names
    if not names:
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"{where}: no interactions (the table is empty)")
        names = list(first)
    names = list(names)
    found = _resolve_columns(names, wanted, where)

    def convert(batch, indices):
        out = {role: _ids(batch[found[role]], indices, role, found[role], where) for role in REQUIRED}
        if "timestamp" in found:
            column = found["timestamp"]
            out["timestamp"] = [_time_value(v, where, column, row) for v, row in zip(batch[column], indices)]
        else:
            out["timestamp"] = [float(i) for i in indices]
        if "rating" in found:  # kept as information only: a missing rating is NaN
            out["rating"] = [math.nan if v is None else float(v) for v in batch[found["rating"]]]
        return out

    features = {"user": "string", "item": "string", "timestamp": "float64"}
    if "rating" in found:
        features["rating"] = "float64"
    features = datasets.Features({k: datasets.Value(v) for k, v in features.items()})
    return dataset.map(convert, batched=True, with_indices=True, remove_columns=names, features=features)


def _ids(values: list, rows: list, role: str, column: str, where: str) -> list[str]:
    """Ids as strings; a missing or nested one is an error that names the column and row."""
    out = []
    for value, row in zip(values, rows):
        if isinstance(value, str) and value.strip():
            out.append(value)
        elif isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out.append(str(value))
        elif isinstance(value, bytes):
            try:
                out.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"{where}: row {row}: {role} id (column {column!r}) {value[:40]!r} is not UTF-8 "
                                 f"text") from None
        elif value is None or isinstance(value, (str, float, list, tuple, dict)):
            raise ValueError(f"{where}: row {row}: {role} id (column {column!r}) is {_describe(value)}; every event "
                             f"needs one {role} id (a string or a number)")
        else:
            out.append(str(value))
    return out


def _describe(value) -> str:
    if value is None:
        return "missing (null)"
    if isinstance(value, float):
        return "NaN (missing)"
    if isinstance(value, str):
        return "empty"
    kind = {list: "a list", tuple: "a list", dict: "a dict (struct)"}[type(value)]
    text = repr(value)
    return f"{kind}, {text if len(text) <= 40 else text[:37] + '...'}, not a single id"


def _time_value(value, where: str, column: str = "timestamp", row: int | None = None) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if hasattr(value, "isoformat") and not isinstance(value, (int, float)):  # a date
        return datetime.fromisoformat(value.isoformat()).timestamp()
    at = f"row {row}: " if row is not None else ""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{where}: {at}the timestamp (column {column!r}) is {_describe(value)}; drop the event or "
                         f"pass timestamp_column='' to use file order")
    try:
        return float(value)
    except (TypeError, ValueError):
        try:
            return datetime.fromisoformat(str(value).strip()).timestamp()
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {at}timestamp {value!r} (column {column!r}) is not a number or an ISO "
                             f"date") from None
