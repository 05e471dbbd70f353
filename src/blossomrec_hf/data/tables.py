"""Columnar tables in and out of the data layer, with or without the ``datasets`` library.

The data functions compute on numpy columns and hand results back as ``datasets.Dataset`` (Arrow-backed, what the
rest of the Hugging Face stack expects). Where ``datasets`` is not installed (the GPU machine), the same columns come
back as a ``ColumnTable``: the small part of the ``Dataset`` interface the trainer uses (``len``, ``column_names``,
``table[i]`` -> row dict, ``table["column"]`` -> list), so training from raw files needs only numpy.

List-valued columns (histories, windows) travel as ``Ragged`` (CSR: ``values[offsets[i]:offsets[i + 1]]``), so no
Python list per row is built on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
except ImportError:  # the GPU machine has no `datasets`
    datasets = None


@dataclass(frozen=True)
class Ragged:
    """Rows of varying length, flat: row i is ``values[offsets[i]:offsets[i + 1]]``."""

    offsets: np.ndarray  # int64 [n_rows + 1], offsets[0] == 0
    values: np.ndarray

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, values: np.ndarray) -> "Ragged":
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(offsets, values)

    @classmethod
    def from_lists(cls, rows) -> "Ragged":
        rows = [np.asarray(row, dtype=np.int64) for row in rows]
        values = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return cls.from_lengths(np.array([len(r) for r in rows], dtype=np.int64), values)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def slices(self, start: np.ndarray, end: np.ndarray) -> "Ragged":
        """Row r is ``values[start[r]:end[r]]`` (absolute positions into ``values``)."""
        lengths = np.maximum(end - start, 0)
        index = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths - start, lengths)
        return Ragged.from_lengths(lengths, self.values[index])


class ColumnTable:
    """A read-only stand-in for ``datasets.Dataset`` over numpy columns (used only without ``datasets``)."""

    def __init__(self, columns: dict):
        self._columns = dict(columns)
        self.num_rows = len(next(iter(self._columns.values()))) if self._columns else 0

    @property
    def column_names(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return self.num_rows

    def _value(self, column, i):
        value = column[i]
        return value.tolist() if isinstance(value, np.ndarray | np.generic) else value

    def __getitem__(self, key):
        if isinstance(key, str):
            column = self._columns[key]
            if isinstance(column, Ragged):
                return [column[i].tolist() for i in range(len(column))]
            return column.tolist()
        i = int(key)
        if not -self.num_rows <= i < self.num_rows:
            raise IndexError(f"row {i} out of range for a table of {self.num_rows} rows")
        i %= max(self.num_rows, 1)
        return {name: self._value(column, i) for name, column in self._columns.items()}

    def __iter__(self):
        return (self[i] for i in range(self.num_rows))

    def __repr__(self) -> str:
        return f"ColumnTable(num_rows={self.num_rows}, columns={self.column_names})"


def make_table(columns: dict):
    """A ``datasets.Dataset`` (or a ``ColumnTable`` without ``datasets``) from numpy / ``Ragged`` columns."""
    if datasets is None:
        return ColumnTable(columns)
    # A random fingerprint, not a hash of the contents: hashing pickles the whole table (0.7 s per 5M events, and it
    # failed on the GPU machine's dill/pyarrow pair) and buys nothing for a table that lives in memory.
    return datasets.Dataset(to_arrow(columns), fingerprint=generate_random_fingerprint())


def make_table_dict(tables: dict):
    return datasets.DatasetDict(tables) if datasets is not None else dict(tables)


def to_arrow(columns: dict):
    import pyarrow as pa

    arrays = {}
    for name, column in columns.items():
        if isinstance(column, Ragged):
            arrays[name] = pa.ListArray.from_arrays(pa.array(column.offsets, pa.int64()),
                                                    pa.array(column.values, pa.int64()))
        elif column.dtype.kind in "OUS":
            arrays[name] = pa.array(column, pa.string())
        else:
            arrays[name] = pa.array(column)
    return pa.table(arrays)


def from_arrow(table) -> dict:
    """numpy / ``Ragged`` columns of a ``pyarrow.Table``."""
    import pyarrow as pa

    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            offsets = column.offsets.to_numpy().astype(np.int64)
            values = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
            columns[name] = Ragged(offsets - offsets[0], values[offsets[0]:offsets[-1]])
        else:
            columns[name] = column.to_numpy(zero_copy_only=False)
    return columns


def read_columns(table, names: list[str], *, what: str = "table") -> dict:
    """The named columns of a Dataset, IterableDataset, ColumnTable or dict of columns, as numpy / ``Ragged``.

    A missing column is an error that names it and lists the columns there are.
    """
    available = list(getattr(table, "column_names", None) or (table.keys() if isinstance(table, dict) else []))
    if datasets is not None and isinstance(table, datasets.IterableDataset):
        table = _collect(table, names)
        available = list(table)
    missing = [n for n in names if n not in available]
    if missing:
        raise KeyError(f"{what} has no column {', '.join(map(repr, missing))}; its columns are {available}")
    if isinstance(table, ColumnTable):
        return {n: table._columns[n] for n in names}
    if datasets is not None and isinstance(table, datasets.Dataset):
        return from_arrow(table.select_columns(names).with_format("arrow")[:])
    out = {}
    for n in names:  # a dict of columns
        column = table[n]
        if isinstance(column, (Ragged, np.ndarray)):
            out[n] = column
        elif len(column) and isinstance(column[0], (list, tuple, np.ndarray)):
            out[n] = Ragged.from_lists(column)
        else:
            out[n] = np.asarray(column)
    return out


def _collect(iterable, names: list[str], batch_size: int = 100_000) -> dict:
    """Columns of a streamed dataset, batch by batch (one numpy array per batch, not one object per event)."""
    parts: dict[str, list] = {n: [] for n in names}
    for batch in iterable.iter(batch_size=batch_size):
        for n in names:
            if n in batch:
                parts[n].append(np.asarray(batch[n]))
    return {n: np.concatenate(p) for n, p in parts.items() if p}
