"""Train BlossomRec and the dense (SASRec) baseline side by side on real logs and tabulate their test metrics.

Each run is `scripts/train.py` with the settings below, started as its own process (several share one GPU), so the
numbers are exactly what a user gets from the training script. Prints a table and writes
`benchmarks/results/quality.json` (or --results).

    python scripts/benchmark_quality.py --runs beauty-blossom beauty-dense ml100k-blossom ml100k-dense
"""

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Ranking leaves out the user's own history: in both logs no target ever repeats an earlier item of its user, so this
# only removes impossible candidates (as the S3Rec/ICLRec code that made the Beauty split does).
# Beauty is sparse (8.9 items per user): dropout 0.5 as in SASRec's own Beauty setting.
BEAUTY = ["--dataset", "{data}/Beauty.txt", "--max_seq_length", "50", "--num_train_epochs", "200",
          "--early_stopping_patience", "15", "--per_device_train_batch_size", "256", "--hidden_dropout_prob", "0.5",
          "--exclude_history"]
ML100K = ["--dataset", "{data}/ml-100k.inter", "--max_seq_length", "200", "--num_train_epochs", "400",
          "--early_stopping_patience", "20", "--per_device_train_batch_size", "128", "--exclude_history"]
RUNS = {
    "beauty-blossom": BEAUTY + ["--attention_type", "blossom"],
    "beauty-dense": BEAUTY + ["--attention_type", "dense"],
    "ml100k-blossom": ML100K + ["--attention_type", "blossom"],
    "ml100k-dense": ML100K + ["--attention_type", "dense"],
    # the loss: sampled softmax with a few negative counts and draws, against the full softmax above
    **{f"beauty-blossom-sampled{count}": BEAUTY + ["--attention_type", "blossom", "--loss_type", "sampled",
                                                   "--num_negatives", str(count)] for count in (128, 512, 2048)},
    "beauty-blossom-mixed512": BEAUTY + ["--attention_type", "blossom", "--loss_type", "sampled",
                                         "--num_negatives", "512", "--negative_sampling", "mixed"],
}
COLUMNS = ["recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr@10"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--extra", default="", help="more train.py flags for every run, e.g. '--hidden_dropout_prob 0.5'")
    parser.add_argument("--blossom_backend", default=None, choices=["blossom_torch", "blossom_triton"],
                        help="attn_implementation of the BlossomRec runs (default: the model's choice)")
    parser.add_argument("--tag", default="", help="suffix of the run names and output folders")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"), help="where the logs are")
    parser.add_argument("--output_root", default="outputs/quality")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs from their last checkpoint")
    parser.add_argument("--results", default="benchmarks/results/quality.json")
    parser.add_argument("--time_limit_s", type=float, default=0,
                        help="send SIGTERM to runs still going after this long (they checkpoint and stop)")
    args = parser.parse_args()

    started, processes = time.time(), {}
    for name in args.runs:
        run = f"{name}{args.tag}"
        output_dir = Path(args.output_root) / run
        command = [sys.executable, str(REPO / "scripts" / "train.py"),
                   *(flag.format(data=args.data_dir) for flag in RUNS[name]), *shlex.split(args.extra),
                   *(["--attn_implementation", args.blossom_backend]
                     if args.blossom_backend and name.endswith("blossom") else []),
                   "--output_dir", str(output_dir),
                   *(["--resume_from_checkpoint", "latest"] if args.resume else ["--overwrite_output_dir"])]
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(f"{output_dir}.log", "a" if args.resume else "w")
        print("$", shlex.join(command), flush=True)
        processes[run] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), output_dir, command)

    while any(process.poll() is None for process, _, _ in processes.values()):
        if args.time_limit_s and time.time() - started > args.time_limit_s:
            for process, _, _ in processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            args.time_limit_s = 0
        time.sleep(2)

    results = {}
    for run, (process, output_dir, command) in processes.items():
        metrics_file = output_dir / "metrics.json"
        if process.returncode != 0 or not metrics_file.exists():
            results[run] = {"status": f"failed (exit {process.returncode}), see {output_dir}.log",
                            "command": shlex.join(command)}
            continue
        metrics = json.loads(metrics_file.read_text())
        results[run] = {"status": "ok", "command": shlex.join(command), **metrics}

    header = ["run", *COLUMNS, "best epoch", "s to best", "items/s"]
    rows = []
    for run, result in results.items():
        if result["status"] != "ok":
            rows.append([run, result["status"]])
            continue
        test = result["test"]["model"]
        rows.append([run, *(f"{test[c]:.4f}" for c in COLUMNS), str(result["best_epoch"]),
                     f"{result['train_seconds_to_best']:.0f}", f"{result['train_items_per_second']:.0f}"])
        popularity = result["test"]["popularity"]
        rows.append(["  popularity", *(f"{popularity[c]:.4f}" for c in COLUMNS), "", "", ""])
    widths = [max(len(row[i]) for row in [header, *rows] if i < len(row)) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))

    results_file = Path(args.results)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(results_file.read_text()) if results_file.exists() else {}
    results_file.write_text(json.dumps({**previous, **results}, indent=2))
    print(f"wrote {results_file}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
