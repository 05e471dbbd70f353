"""The interaction-log data layer: read logs, build time-ordered histories, split leave-one-out, cut training windows.

    from blossomrec_hf.data import prepare_data, training_windows

    data = prepare_data("../shared/data/Beauty.txt")          # or "synthetic" (default), a prepared dir, a Hub id
    data.splits["train"], data.splits["validation"], data.splits["test"]
    windows = training_windows(data.splits["train"], max_seq_length=50)   # or check_trainable(data, 50): the same,
                                                                           # or a ValueError saying why it can't train
    data.vocab.n_items, data.vocab.save_pretrained(model_dir)

Results are ``datasets.Dataset`` / ``DatasetDict``; without the ``datasets`` library (the GPU machine) the text formats
and the synthetic data still work and come back as ``ColumnTable`` / dict.
"""

from .checks import check_trainable
from .errors import DataWarning, MissingDependencyError, one_line_data_warnings, user_input_errors
from .histories import build_histories, leave_one_out, training_windows
from .prepared import PreparedData, check_output_directory, prepare_data
from .readers import FORMATS, detect_format, load_interactions
from .synthetic import generate_synthetic_interactions
from .tables import ColumnTable
from .vocabulary import VOCABULARY_FILE, ItemVocabulary

__all__ = [
    "FORMATS",
    "VOCABULARY_FILE",
    "ColumnTable",
    "DataWarning",
    "ItemVocabulary",
    "MissingDependencyError",
    "PreparedData",
    "build_histories",
    "check_output_directory",
    "check_trainable",
    "detect_format",
    "generate_synthetic_interactions",
    "leave_one_out",
    "load_interactions",
    "one_line_data_warnings",
    "prepare_data",
    "training_windows",
    "user_input_errors",
]
