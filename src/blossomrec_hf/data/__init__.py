"""Interaction-log data layer: read logs, build time-ordered sequences, split, batch.

    from blossomrec_hf.data import load_sequences, train_dataset, eval_dataset

    data = load_sequences("../shared/data/Beauty.txt")   # any supported format
    train = train_dataset(data, max_len=50)             # item_ids, labels
    valid = eval_dataset(data, "valid", max_len=50)     # item_ids, target, user
    test = eval_dataset(data, "test", max_len=50, negatives=100)   # + negatives (uni100)
    for batch in train.batches(2048, shuffle=True): ...

``data.n_items`` sizes the model (embedding rows ``n_items + 1``, row 0 padding).
"""

from .readers import FORMATS, detect_format, read_interactions
from .sequences import SequenceData, load_sequences
from .torch_data import IGNORE_INDEX, SequenceDataset, eval_dataset, pad_windows, sample_negatives, train_dataset

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "SequenceData",
    "SequenceDataset",
    "detect_format",
    "eval_dataset",
    "load_sequences",
    "pad_windows",
    "read_interactions",
    "sample_negatives",
    "train_dataset",
]
