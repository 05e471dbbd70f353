"""Prepare an interaction log once: leave-one-out splits as Parquet plus item_vocabulary.json, so training starts fast.

    python scripts/prepare_data.py --dataset ../shared/data/ml-100k.inter --output_dir data/ml-100k
    python scripts/prepare_data.py --dataset ../shared/data/Beauty.txt --output_dir data/beauty
    python scripts/prepare_data.py --dataset owner/name --streaming --output_dir data/hub   # a Hub dataset id
    python scripts/prepare_data.py --dataset synthetic --num_users 5000 --output_dir data/synthetic

``train.py --dataset DIR`` then loads DIR as it is. The sizes are printed and kept in DIR/prepared_data.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from blossomrec_hf.data import FORMATS, prepare_data

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
    args = parse_args(argv)
    if args.dataset == "synthetic":
        options = {k: getattr(args, k) for k in SYNTHETIC_OPTIONS if getattr(args, k) is not None}
    else:
        given = [f"--{k}" for k in SYNTHETIC_OPTIONS if getattr(args, k) is not None]
        if given:
            print(f"error: {', '.join(given)} apply only to --dataset synthetic", file=sys.stderr)
            return 2
        options = {"format": args.format, "user_column": args.user_column, "item_column": args.item_column,
                   "timestamp_column": args.timestamp_column, "rating_column": args.rating_column,
                   "split": args.split, "streaming": args.streaming}
    try:
        data = prepare_data(args.dataset, max_seq_length=args.max_seq_length, k_core=args.k_core,
                            min_history_length=args.min_history_length, **options)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: dataset {args.dataset!r}: {message}", file=sys.stderr)
        return 1
    data.save(args.output_dir)
    print(json.dumps(data.info, indent=2))
    print(f"wrote {args.output_dir}: train/validation/test Parquet and item_vocabulary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
