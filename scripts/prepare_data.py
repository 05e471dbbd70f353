"""Prepare an interaction log once: leave-one-out splits as Parquet plus item_vocabulary.json, so training starts fast.

    python scripts/prepare_data.py --dataset ../shared/data/ml-100k.inter --output_dir data/ml-100k
    python scripts/prepare_data.py --dataset ../shared/data/Beauty.txt --output_dir data/beauty
    python scripts/prepare_data.py --dataset owner/name --streaming --output_dir data/hub   # a Hub dataset id
    python scripts/prepare_data.py --dataset synthetic --num_users 5000 --output_dir data/synthetic

``train.py --dataset DIR`` then loads DIR as it is. The sizes are printed and kept in DIR/prepared_data.json.

The data must pass the checks training makes (``check_trainable``: users to evaluate, training windows), else
nothing is written. DIR is written atomically (a temporary folder beside it, renamed when complete), replacing an
earlier prepared DIR; any other non-empty DIR is refused. Bad input is one ``error: ...`` line on stderr and exit
status 2 (as for bad flags); suspicious data that is kept (exactly repeated events) is one ``warning: ...`` line;
Ctrl-C exits with 130, leaving nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import sys

from blossomrec_hf.data import (
    FORMATS,
    check_output_directory,
    check_trainable,
    one_line_data_warnings,
    prepare_data,
    user_input_errors,
)
from blossomrec_hf.data.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from blossomrec_hf.data.tables import datasets

SYNTHETIC_OPTIONS = ("num_users", "num_items", "max_history_length", "seed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic",
                   help="a file, a Hub dataset id / load_dataset path, or 'synthetic' (default)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_seq_length", type=int, default=50, help="recorded with the data (training windows)")
    p.add_argument("--k_core", type=int, default=0, help="iterative k-core filter on users and items (0 = off)")
    p.add_argument("--min_history_length", type=int, default=3, help="drop users with fewer interactions")
    reader = p.add_argument_group("reading a log")
    reader.add_argument("--format", default="auto", choices=FORMATS)
    reader.add_argument("--user_column")
    reader.add_argument("--item_column")
    reader.add_argument("--timestamp_column", help="'' ignores the source's time column (file order)")
    reader.add_argument("--rating_column")
    reader.add_argument("--split", default="train", help="split of a Hub dataset")
    reader.add_argument("--streaming", action="store_true", help="stream a Hub / Parquet / JSON source")
    synthetic = p.add_argument_group("the synthetic dataset")
    synthetic.add_argument("--num_users", type=int)
    synthetic.add_argument("--num_items", type=int)
    synthetic.add_argument("--max_history_length", type=int)
    synthetic.add_argument("--seed", type=int)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The exit status: 0, 2 after one ``error:`` line for bad input (argparse's own errors raise ``SystemExit(2)``),
    130 on Ctrl-C."""
    args = parse_args(argv)
    one_line_data_warnings()
    if datasets is not None:
        datasets.disable_progress_bars()  # the output is the summary below, or one error line
    if args.dataset == "synthetic":
        options = {k: getattr(args, k) for k in SYNTHETIC_OPTIONS if getattr(args, k) is not None}
    else:
        given = [f"--{k}" for k in SYNTHETIC_OPTIONS if getattr(args, k) is not None]
        if given:
            print(f"error: {', '.join(given)} apply only to --dataset synthetic", file=sys.stderr)
            return EXIT_BAD_INPUT
        options = {"format": args.format, "user_column": args.user_column, "item_column": args.item_column,
                   "timestamp_column": args.timestamp_column, "rating_column": args.rating_column,
                   "split": args.split, "streaming": args.streaming}
    try:
        with user_input_errors("--output_dir"):
            check_output_directory(args.output_dir)  # before the work, not after it
        with user_input_errors(f"dataset {args.dataset!r}"):
            data = prepare_data(args.dataset, max_seq_length=args.max_seq_length, k_core=args.k_core,
                                min_history_length=args.min_history_length, **options)
            check_trainable(data, args.max_seq_length)  # what training checks first: refuse before writing
        with user_input_errors("--output_dir"):
            data.save(args.output_dir)
    except SystemExit as stop:  # user_input_errors printed the error line
        return stop.code
    except KeyboardInterrupt:
        print(f"interrupted: {args.output_dir} was not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps(data.info, indent=2))
    print(f"wrote {args.output_dir}: train/validation/test Parquet and item_vocabulary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
