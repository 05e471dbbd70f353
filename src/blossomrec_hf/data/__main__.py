"""``python -m blossomrec_hf.data FILE [FILE ...]``: statistics of interaction logs, as loaded."""

import argparse
import json

from .sequences import load_sequences


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m blossomrec_hf.data", description=__doc__)
    p.add_argument("sources", nargs="+", help="files, hf://owner/name, or saved directories")
    p.add_argument("--format", default=None)
    p.add_argument("--min-rating", type=float, default=None)
    p.add_argument("--k-core", type=int, default=None)
    p.add_argument("--save", default=None, help="write the (single) loaded log to this directory")
    args = p.parse_args(argv)
    for source in args.sources:
        data = load_sequences(source, args.format, min_rating=args.min_rating, k_core=args.k_core)
        print(json.dumps({"source": source, **data.stats()}))
        if args.save:
            data.save(args.save)


if __name__ == "__main__":
    main()
