"""One entry point from a data source to leave-one-out splits and the item vocabulary, and their files on disk.

A prepared directory holds ``train.parquet``, ``validation.parquet``, ``test.parquet``, ``item_vocabulary.json`` and
``prepared_data.json`` (how it was built, and its size), so training on a large log parses and sorts it only once.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field

from .histories import build_histories, leave_one_out
from .readers import load_interactions
from .synthetic import generate_synthetic_interactions
from .tables import from_arrow, make_table, make_table_dict, read_columns, to_arrow
from .vocabulary import VOCABULARY_FILE, ItemVocabulary

SPLITS = ("train", "validation", "test")
SPLIT_COLUMNS = {"train": ["user", "items"], "validation": ["user", "history", "target"],
                 "test": ["user", "history", "target"]}
INFO_FILE = "prepared_data.json"


@dataclass
class PreparedData:
    splits: object  # datasets.DatasetDict (a dict of ColumnTables without `datasets`): train, validation, test
    vocab: ItemVocabulary
    info: dict = field(default_factory=dict)  # source, filters, sizes

    def save(self, directory: str | os.PathLike) -> None:
        """Write the prepared folder atomically: into a temporary folder beside ``directory``, renamed into place
        once complete, so an error or Ctrl-C never leaves a half-written folder. An existing prepared folder (or an
        empty folder) is replaced; any other existing path is refused before anything is written."""
        import pyarrow.parquet as pq

        check_output_directory(directory)
        directory = os.path.abspath(os.fspath(directory))
        parent, name = os.path.split(directory)
        os.makedirs(parent, exist_ok=True)
        staging = os.path.join(parent, f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.mkdir(staging)  # with the umask's permissions, unlike tempfile.mkdtemp's 0o700
        try:
            for split in SPLITS:
                table = to_arrow(read_columns(self.splits[split], SPLIT_COLUMNS[split], what=f"split {split!r}"))
                pq.write_table(table, os.path.join(staging, f"{split}.parquet"))
            self.vocab.save_pretrained(staging)
            with open(os.path.join(staging, INFO_FILE), "w") as f:
                json.dump(self.info, f, indent=2)
            _replace_directory(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PreparedData":
        import pyarrow.parquet as pq

        missing = [f for f in (*(f"{s}.parquet" for s in SPLITS), VOCABULARY_FILE)
                   if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise FileNotFoundError(f"{directory} is not a prepared dataset: it lacks {', '.join(missing)}")
        splits = make_table_dict({name: make_table(from_arrow(pq.read_table(os.path.join(directory, f"{name}.parquet"))))
                                  for name in SPLITS})
        info_path = os.path.join(directory, INFO_FILE)
        info = {}
        if os.path.isfile(info_path):
            with open(info_path) as f:
                info = json.load(f)
        return cls(splits, ItemVocabulary.from_pretrained(directory), info)


def is_prepared_directory(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and os.path.isfile(os.path.join(source, INFO_FILE))


def check_output_directory(directory: str | os.PathLike) -> None:
    """``FileExistsError`` unless ``directory`` can take a prepared dataset: it does not exist, is empty, or holds
    a prepared dataset (which is then replaced). Cheap: call it before preparing, not only when saving."""
    directory = os.fspath(directory)
    if not os.path.lexists(directory) or is_prepared_directory(directory):
        return
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise FileExistsError(f"{directory} exists and is not a folder (or is a link to one that is not a prepared "
                              f"dataset); choose another output folder")
    if os.listdir(directory):
        raise FileExistsError(f"{directory} exists and is not empty nor a prepared dataset (no {INFO_FILE}); "
                              f"choose a new or empty output folder")


def _replace_directory(staging: str, directory: str) -> None:
    """Rename the complete ``staging`` folder to ``directory``; an old ``directory`` is moved aside first and then
    deleted, so at every moment ``directory`` is either the old folder, absent (for two renames), or the new one."""
    old = None
    if os.path.lexists(directory):
        old = f"{staging}.old"
        os.rename(directory, old)
    try:
        os.rename(staging, directory)
    except BaseException:
        if old is not None:
            os.rename(old, directory)
        raise
    if old is not None and os.path.islink(old):
        os.unlink(old)
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_data(source="synthetic", *, max_seq_length: int = 50, k_core: int = 0, min_history_length: int = 3,
                 **reader_kwargs) -> PreparedData:
    """Leave-one-out splits and vocabulary of ``source``.

    ``source``: ``"synthetic"`` (the built-in default; ``reader_kwargs`` then go to
    ``generate_synthetic_interactions``), a directory written by ``PreparedData.save`` (loaded as it is), or anything
    ``load_interactions`` reads (``reader_kwargs`` go to it). ``max_seq_length`` is recorded in ``info``; the
    training windows come from ``training_windows(splits["train"], max_seq_length)``.
    """
    if is_prepared_directory(source):
        data = PreparedData.load(source)
        asked = {"k_core": k_core, "min_history_length": min_history_length}
        built = {key: data.info.get(key) for key in asked}
        if any(built[key] is not None and built[key] != asked[key] for key in asked):
            raise ValueError(f"{source} was prepared with {built}, not {asked}: prepare it again or pass the same "
                             f"filters")
        return data
    if source == "synthetic":
        events = generate_synthetic_interactions(**reader_kwargs)
    else:
        events = load_interactions(source, **reader_kwargs)
    histories, vocab = build_histories(events, k_core=k_core, min_history_length=min_history_length)
    splits = leave_one_out(histories)
    lengths = read_columns(histories, ["items"])["items"].lengths
    info = {
        "source": os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__,
        "reader_kwargs": {k: v for k, v in reader_kwargs.items() if isinstance(v, (str, int, float, bool))},
        "max_seq_length": max_seq_length,
        "k_core": k_core,
        "min_history_length": min_history_length,
        "users": int(len(lengths)),
        "items": vocab.n_items,
        "interactions": int(lengths.sum()),
        "mean_history_length": float(lengths.mean()),
        "max_history_length": int(lengths.max()),
        "evaluated_users": int(len(splits["test"])),
    }
    return PreparedData(splits, vocab, info)

