"""Train BlossomRec and the dense (SASRec) baseline side by side on real logs and tabulate their test metrics.

Each run is `scripts/train.py` with the settings below, started as its own process (at most --max_parallel at once,
default one: processes sharing one GPU slow each other down far more than they overlap), so the numbers are exactly
what a user gets from the training script. Every run is repeated for each of --seeds and each of --layouts (`packed`:
train.py's default packed batches; `padded`: `--max_tokens_per_batch 0`); run names and output folders are
`<run>[-padded][-<variant>]<tag>-seed<S>`.

One seed says little: the table gives, per configuration (run and layout), the mean, standard deviation (ddof=1)
and standard error over seeds, and for each run packed against padded: the difference of mean NDCG@10 next to its
standard error, and the packed/padded ratios of training seconds to the best epoch and of items/s. Prints the
tables, writes them to `benchmarks/results/quality.txt` and everything (each run too) to
`benchmarks/results/quality.json` (or --results, same stem).

    python scripts/benchmark_quality.py --runs beauty-blossom beauty-dense --seeds 0 1 2 --layouts packed padded

The paper's ablation table (issue 14) on Beauty and ML-100K: `--table ablation` runs `{beauty,ml100k}-{blossom,
ltis,stis,nogate,nocomp,dense}` (BlossomRec; LTIS only: selected blocks, own block and compressed branch; STIS only;
without the gate: every branch weighted 0.5; without the compressed branch; dense causal attention) and adds a block
with NDCG@10 and HR@10 (mean +- std over seeds), training seconds to the best epoch and peak memory:

    python scripts/benchmark_quality.py --table ablation --seeds 0 1 2 --results benchmarks/results/ablation.json

Tuning on validation only (issue 14's protocol): `--variants NAME=FLAGS ...` trains every run once more per variant
(its train.py flags after the run's own; configuration `<run>[-padded]-NAME`), and a block names, per run and layout,
the variant whose mean validation NDCG@10 over the seeds is best, with its test metrics. Tuning runs train with
`--do_predict false`, so no variant's test split is ranked while choosing; afterwards `scripts/evaluate.py` ranks the
test split of the chosen variant's runs only (each run's saved best model, its data and ranking flags as
training_args.json records them; into `test_metrics.json` beside it):

    python scripts/benchmark_quality.py --runs ml100k-blossom --seeds 0 1 2 \
        --variants base= pubgate='--gate_init published' drop3='--hidden_dropout_prob 0.3'

Peak memory: train.py's metrics.json does not record it, so this script measures each run from outside: the GPU
memory of the run's process as nvidia-smi reports it (sampled every second; CUDA context and the allocator's cache
included, so above what tensors need; n/a where nvidia-smi lists no processes, e.g. in some containers), and the peak
resident memory of the process (its rusage). A `peak_gpu_memory_mib` in metrics.json (e.g. the trainer's
torch.cuda.max_memory_allocated() / 2**20) would be used instead of the nvidia-smi sample.

The test (tests/test_benchmark_quality.py) runs it on a tiny synthetic log with tiny model flags in --extra; any
train.py flag given there comes after the run's own, so it wins.
"""

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from blossomrec_hf.training_args import DataArguments, EvaluationArguments

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
DEFAULT_RUNS = list(RUNS)
# The paper's ablations (BlossomRecConfig fields): a variant's flags after the dataset's. blossom and dense are the runs
# above.
ABLATIONS = {
    "blossom": ["--attention_type", "blossom"],
    "ltis": ["--attention_type", "blossom", "--blossom_branches", "ltis"],
    "stis": ["--attention_type", "blossom", "--blossom_branches", "stis"],
    "nogate": ["--attention_type", "blossom", "--gate_type", "fixed"],
    "nocomp": ["--attention_type", "blossom", "--use_compressed_branch", "false"],
    "dense": ["--attention_type", "dense"],
}
ABLATION_DESCRIPTIONS = {"blossom": "BlossomRec", "ltis": "LTIS only", "stis": "STIS only",
                         "nogate": "without the gate (0.5 each)", "nocomp": "without the compressed branch",
                         "dense": "dense (SASRec)"}
ABLATION_DATASETS = {"beauty": BEAUTY, "ml100k": ML100K}
RUNS.update({f"{dataset}-{variant}": flags + ABLATIONS[variant]
             for dataset, flags in ABLATION_DATASETS.items() for variant in ABLATIONS})
ABLATION_RUNS = [f"{dataset}-{variant}" for dataset in ABLATION_DATASETS for variant in ABLATIONS]
TABLES = {"default": DEFAULT_RUNS, "ablation": ABLATION_RUNS}
LAYOUTS = {"packed": [], "padded": ["--max_tokens_per_batch", "0"]}
COLUMNS = ["recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr@10"]
# per-run numbers besides the test metrics that are aggregated over seeds: (metrics.json key, table heading, format)
# (peak memory: measured by this script unless metrics.json has it; None where it could not be measured)
TRAINING = [("best_epoch", "best epoch", "{:.1f}"), ("train_seconds_to_best", "s to best", "{:.0f}"),
            ("train_items_per_second", "items/s", "{:.0f}"), ("peak_gpu_memory_mib", "peak GPU MiB", "{:.0f}"),
            ("peak_rss_mib", "peak RSS MiB", "{:.0f}")]
GPU_POLL_S = 1.0
HEADER = [*COLUMNS, *(heading for _, heading, _ in TRAINING)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=None, choices=list(RUNS),
                        help="runs to train (default: those of --table)")
    parser.add_argument("--table", default="default", choices=list(TABLES),
                        help="default: BlossomRec and dense on both logs and the loss variants on Beauty; ablation: "
                             f"the paper's ablation table ({' '.join(ABLATION_RUNS)}) and its summary block")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="train.py --seed of each repetition")
    parser.add_argument("--layouts", nargs="+", default=["packed"], choices=list(LAYOUTS))
    parser.add_argument("--max_parallel", type=int, default=1,
                        help="training processes running at once (queue); on one GPU keep 1: twelve at once on an "
                             "H100 each trained at ~4,000 items/s, against 30,000-190,000 alone")
    parser.add_argument("--extra", default="", help="more train.py flags for every run, after the run's own (so they "
                        "win), e.g. --extra='--hidden_dropout_prob 0.5' (the = lets a single flag through argparse)")
    parser.add_argument("--blossom_backend", default=None, choices=["blossom_torch", "blossom_triton"],
                        help="attn_implementation of the BlossomRec runs (default: the model's choice)")
    parser.add_argument("--tag", default="", help="suffix of the run names and output folders")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME=FLAGS",
                        help="tuning on validation: every run is also trained with each variant's train.py flags "
                             "(e.g. pubgate='--gate_init published'; configuration `<run>[-padded]-NAME`), and a "
                             "block names, per run and layout, the variant of the best mean validation NDCG@10 "
                             "with its test metrics (the test split never chooses)")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"), help="where the logs are")
    parser.add_argument("--output_root", default="outputs/quality")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted runs from their last checkpoint (runs without one start afresh); "
                             "runs that finished are read, not trained again")
    parser.add_argument("--results", default="benchmarks/results/quality.json")
    parser.add_argument("--time_limit_s", type=float, default=0,
                        help="after this long, send SIGTERM to runs still going (they checkpoint and stop) and start "
                             "no more")
    args = parser.parse_args(argv)
    if args.max_parallel < 1:
        parser.error("--max_parallel must be at least 1")
    if args.runs is None:
        args.runs = list(TABLES[args.table])
    try:
        args.variants = parse_variants(args.variants)
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_variants(specs: list[str] | None) -> dict[str, list[str]]:
    """--variants NAME=FLAGS ... -> {name: train.py flags}; without --variants one unnamed variant of no flags."""
    if not specs:
        return {"": []}
    variants = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        if not re.fullmatch(r"[a-z0-9_]+", name) or name in variants:
            raise ValueError(f"--variants: {spec!r} is not NAME=FLAGS with a new name of lowercase letters, digits "
                             f"and _")
        variants[name] = shlex.split(flags)
    return variants


RUN_RECORD = "benchmark_quality_run.json"  # how this script started a run, and its end; in the run's output folder
TEST_METRICS = "test_metrics.json"  # a tuning run's test split, ranked by scripts/evaluate.py once it was chosen


def read_record(output_dir: Path, training: list[str]) -> dict | None:
    """What this script recorded of the run in `output_dir` (its train.py flags at start; its command, peak memory
    and `finished` once it exited cleanly with its metrics), if it was started with exactly these train.py flags."""
    record_file = output_dir / RUN_RECORD
    if not record_file.exists():
        return None
    record = json.loads(record_file.read_text())
    return record if record.get("training") == training else None


def write_record(job: dict, finished: bool) -> None:
    """Record a run when it starts, and again when it exits 0 with its metrics (at once, so that a later --resume
    finds it even if this call is killed before the tables)."""
    measured = {key: job.get(key) for key in ("peak_gpu_memory_mib", "peak_rss_mib")} if finished else {}
    (job["output_dir"] / RUN_RECORD).write_text(json.dumps({"training": job["training"], "command": job["command"],
                                                             "finished": finished, **measured}))


def plan(args) -> list[dict]:
    """One job per run, layout, variant and seed, with its train.py command."""
    jobs = []
    for name, layout, (variant, variant_flags) in itertools.product(args.runs, args.layouts, args.variants.items()):
        config = f"{name}{'-padded' if layout == 'padded' else ''}{'-' + variant if variant else ''}{args.tag}"
        for seed in args.seeds:
            output_dir = Path(args.output_root) / f"{config}-seed{seed}"
            training = [sys.executable, str(REPO / "scripts" / "train.py"),
                        *(flag.format(data=args.data_dir) for flag in RUNS[name]), *LAYOUTS[layout], *variant_flags,
                        *(["--do_predict", "false"] if variant else []), "--seed", str(seed), *shlex.split(args.extra),
                        *(["--attn_implementation", args.blossom_backend]
                          if args.blossom_backend and "blossom" in RUNS[name] else []),
                        "--output_dir", str(output_dir)]
            # --resume continues only a run started with the same flags; one started otherwise starts afresh
            record = read_record(output_dir, training) if args.resume else None
            finished = bool(record and record["finished"] and (output_dir / "metrics.json").exists())
            resume = record is not None and any((output_dir / "checkpoints").glob("step-*"))
            command = training + (["--resume_from_checkpoint", "latest"] if resume else ["--overwrite_output_dir"])
            jobs.append({"run": f"{config}-seed{seed}", "config": config, "name": name, "layout": layout,
                         "variant": variant, "seed": seed, "output_dir": output_dir, "training": training,
                         "command": command, "resume": resume, **(record if finished else {}), "finished": finished})
    return jobs


def gpu_memory_by_process() -> dict[int, float]:
    """MiB of GPU memory used by each process, as nvidia-smi lists them ({} without nvidia-smi or processes)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        listing = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    used = {}
    for line in listing.splitlines():
        pid, _, mib = line.partition(",")
        try:
            used[int(pid)] = used.get(int(pid), 0.0) + float(mib)
        except ValueError:
            continue
    return used


def _reap(process: subprocess.Popen) -> tuple[int, float | None] | None:
    """The exit status and peak resident memory (MiB) of a finished process, None while it runs. (Reaped with wait4
    for its rusage; one that Popen reaped already, e.g. in send_signal, has no peak memory.)"""
    if process.returncode is not None:
        return process.returncode, None
    try:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere
        return process.wait(), None
    if pid == 0:
        return None
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024  # Linux: KiB


def run_queue(jobs: list[dict], max_parallel: int, time_limit_s: float = 0) -> tuple[dict, set]:
    """Run the jobs, at most max_parallel at once (all of them at once would not fit one GPU's memory). Returns each
    run's exit status (None: not started, the time limit came first) and the runs sent SIGTERM at the time limit.
    Each finished job gets its process's peak memory: `peak_rss_mib` and, where nvidia-smi lists it,
    `peak_gpu_memory_mib` (sampled every GPU_POLL_S seconds)."""
    started, waiting, running, returncodes, signalled = time.time(), list(jobs), {}, {}, set()
    by_run, polled = {job["run"]: job for job in jobs}, 0.0
    while waiting or running:
        out_of_time = bool(time_limit_s) and time.time() - started > time_limit_s
        while waiting and len(running) < max_parallel and not out_of_time:
            job = waiting.pop(0)
            job["output_dir"].parent.mkdir(parents=True, exist_ok=True)
            for stale in ("metrics.json", TEST_METRICS):  # no earlier run's may pass for this one's
                (job["output_dir"] / stale).unlink(missing_ok=True)
            job["output_dir"].mkdir(exist_ok=True)
            write_record(job, finished=False)
            print("$", shlex.join(job["command"]), flush=True)
            with open(f"{job['output_dir']}.log", "a" if job["resume"] else "w") as log:
                running[job["run"]] = subprocess.Popen(job["command"], stdout=log, stderr=subprocess.STDOUT)
        if out_of_time:
            returncodes.update((job["run"], None) for job in waiting)
            waiting = []
            for run in set(running) - signalled:
                running[run].send_signal(signal.SIGTERM)
                signalled.add(run)
        if running and time.time() - polled >= GPU_POLL_S:
            polled, used = time.time(), gpu_memory_by_process()
            for run, process in running.items():
                if process.pid in used:
                    job = by_run[run]
                    job["peak_gpu_memory_mib"] = max(job.get("peak_gpu_memory_mib") or 0.0, used[process.pid])
        for run, process in list(running.items()):
            finished = _reap(process)
            if finished is not None:
                returncodes[run], by_run[run]["peak_rss_mib"] = finished
                if finished[0] == 0 and (by_run[run]["output_dir"] / "metrics.json").exists():
                    write_record(by_run[run], finished=True)
                del running[run]
        time.sleep(0.2)
    return returncodes, signalled


def collect(job: dict, returncode: int | None, signalled: bool) -> dict:
    """The JSON entry of one run: how it was run, and its metrics.json, or a one-line reason it has none."""
    entry = {"config": job["config"], "name": job["name"], "layout": job["layout"], "variant": job["variant"],
             "seed": job["seed"], "command": shlex.join(job["command"])}
    metrics_file = job["output_dir"] / "metrics.json"
    if returncode is None:
        return {"status": "not started: --time_limit_s reached (start it with --resume)", **entry}
    if returncode == 0 and metrics_file.exists():
        measured = {key: job.get(key) for key in ("peak_gpu_memory_mib", "peak_rss_mib")}
        return {"status": "ok", **entry, **measured, **json.loads(metrics_file.read_text())}
    if signalled:
        return {"status": f"stopped at --time_limit_s (continue with --resume), see {job['output_dir']}.log", **entry}
    return {"status": f"failed (exit {returncode}), see {job['output_dir']}.log", **entry}


def describe(values: list[float | None]) -> dict:
    """Mean, sample standard deviation (ddof=1) and standard error of the mean; no spread from a single value. Values
    that could not be measured (None) are left out; none at all gives None throughout."""
    values = [value for value in values if value is not None]
    if not values:
        return {"mean": None, "std": None, "se": None}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "se": None if std is None else std / math.sqrt(len(values))}


def aggregate(results: dict) -> dict:
    """Per configuration (run and layout), the statistics over its seeds that finished; failed seeds are counted
    but not averaged, so `n` is what the spread rests on."""
    groups = {}
    for entry in results.values():
        groups.setdefault(entry["config"], []).append(entry)
    summary = {}
    for config, entries in groups.items():
        ok = [e for e in entries if e["status"] == "ok"]
        if not ok:
            continue
        tested = [e for e in ok if "test" in e]
        summary[config] = {
            "name": ok[0]["name"], "layout": ok[0]["layout"], "variant": ok[0].get("variant", ""), "n": len(ok),
            "seeds": [e["seed"] for e in ok], "failed_seeds": [e["seed"] for e in entries if e["status"] != "ok"],
            "validation": {c: describe([e["validation"]["model"][c] for e in ok]) for c in COLUMNS},
            "test": {c: describe([e["test"]["model"][c] for e in tested]) for c in COLUMNS},
            "popularity": {c: statistics.fmean(e["test"]["popularity"][c] for e in tested) if tested else None
                           for c in COLUMNS},
            **{key: describe([e.get(key) for e in ok]) for key, _, _ in TRAINING}}
    return summary


def compare(summary: dict) -> dict:
    """Packed against padded for each run (and tag) that has both: is the NDCG@10 difference within one standard
    error of the difference, and how much faster does packing reach the best epoch and push items."""
    by_pair = {}
    for stats in summary.values():
        key = stats["name"] + (f"-{stats['variant']}" if stats.get("variant") else "")
        by_pair.setdefault(key, {})[stats["layout"]] = stats
    comparison = {}
    for name, layouts in by_pair.items():
        if set(layouts) != {"packed", "padded"}:
            continue
        packed, padded = layouts["packed"], layouts["padded"]
        a, b = packed["test"]["ndcg@10"], padded["test"]["ndcg@10"]
        if a["mean"] is None or b["mean"] is None:  # tuning: a variant's test split is ranked only once chosen
            continue
        se = math.hypot(a["se"], b["se"]) if a["se"] is not None and b["se"] is not None else None
        difference = a["mean"] - b["mean"]
        comparison[name] = {
            "n_packed": packed["n"], "n_padded": padded["n"],
            "ndcg@10_packed": a["mean"], "ndcg@10_padded": b["mean"], "ndcg@10_difference": difference,
            "se_difference": se, "within_one_se": None if se is None else abs(difference) <= se,
            "seconds_to_best_ratio": _ratio(packed["train_seconds_to_best"]["mean"],
                                            padded["train_seconds_to_best"]["mean"]),
            "items_per_second_ratio": _ratio(packed["train_items_per_second"]["mean"],
                                             padded["train_items_per_second"]["mean"])}
    return comparison


def choose_on_validation(summary: dict) -> dict:
    """Per run and layout trained with --variants: the variant of the best mean validation NDCG@10 over its seeds,
    every candidate's validation mean beside it, and the chosen one's test metrics (the test split never chooses)."""
    groups = {}
    for config, stats in summary.items():
        if stats.get("variant"):
            groups.setdefault(stats["name"] + ("-padded" if stats["layout"] == "padded" else ""), {})[config] = stats
    chosen = {}
    for group, candidates in groups.items():
        best = max(candidates, key=lambda config: candidates[config]["validation"]["ndcg@10"]["mean"])
        # means over different seeds (a run cut short or failed) are not comparable: such a choice is marked
        seed_sets = {tuple(sorted(stats["seeds"])) for stats in candidates.values()}
        complete = len(seed_sets) == 1 and not any(stats["failed_seeds"] for stats in candidates.values())
        chosen[group] = {"variant": candidates[best]["variant"], "config": best, "n": candidates[best]["n"],
                         "complete": complete,
                         "validation_ndcg@10": {stats["variant"]: stats["validation"]["ndcg@10"]["mean"]
                                                for stats in candidates.values()},
                         "test": candidates[best]["test"]}
    return chosen


def evaluation_flags(output_dir: Path) -> list[str]:
    """scripts/evaluate.py's data and ranking flags for the best model in `output_dir`, as its training_args.json
    recorded them (the same data, filters and ranking the run was validated with)."""
    recorded = json.loads((output_dir / "training_args.json").read_text())
    names = [f.name for group in (DataArguments, EvaluationArguments) for f in dataclasses.fields(group)]
    names += ["max_seq_length", "attn_implementation"]
    return [item for name in names if recorded.get(name) is not None for item in (f"--{name}", str(recorded[name]))]


def rank_chosen_test(results: dict, jobs: list[dict]) -> None:
    """Tuning: rank the test split of the chosen variants' runs (only those, and only once every variant has the same
    seeds done), each with scripts/evaluate.py on the best model the run saved, and put the metrics into their entries
    (read back from test_metrics.json if an earlier invocation ranked them). A failed ranking is noted in the entry
    as `test_error`."""
    output_dirs = {job["run"]: job["output_dir"] for job in jobs}
    # a choice among variants with different seeds done (a run failed, or the time limit came first) is not final:
    # ranking it now could rank a second variant's test split once --resume completes the others
    chosen = {c["config"] for c in choose_on_validation(aggregate(results)).values() if c["complete"]}
    for run, entry in results.items():
        if entry["config"] not in chosen or entry["status"] != "ok" or "test" in entry:
            continue
        output_dir = output_dirs[run]
        if not (output_dir / TEST_METRICS).exists():
            command = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--model", str(output_dir),
                       "--split", "test", *evaluation_flags(output_dir), "--output_file", str(output_dir / TEST_METRICS)]
            print("$", shlex.join(command), flush=True)
            with open(f"{output_dir}.test.log", "w") as log:
                returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
            if returncode != 0:
                entry["test_error"] = f"scripts/evaluate.py failed (exit {returncode}), see {output_dir}.test.log"
                continue
        entry["test"] = json.loads((output_dir / TEST_METRICS).read_text())["metrics"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ablation_rows(summary: dict) -> list[list[str]]:
    """The ablation block: one row per configuration of an ablation run (`<dataset>-<variant>`, any layout or tag),
    datasets in turn, variants in the paper's order."""
    rows = []
    for dataset in ABLATION_DATASETS:
        for variant, description in ABLATION_DESCRIPTIONS.items():
            for config, stats in summary.items():
                if stats["name"] != f"{dataset}-{variant}":
                    continue
                rows.append([config, description, str(stats["n"]),
                             *(_mean_std(stats["test"][c]) for c in ("ndcg@10", "recall@10")),
                             *(_cell(stats[key]["mean"], pattern) for key, _, pattern in TRAINING
                               if key in ("train_seconds_to_best", "peak_gpu_memory_mib", "peak_rss_mib"))])
    return rows


def _mean_std(stats: dict) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.4f}" + ("" if stats["std"] is None else f" +- {stats['std']:.4f}")


def _cell(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Aligned columns; a short row (a failed run's status) runs on past the columns without widening them."""
    full = [row for row in [header, *rows] if len(row) == len(header)]
    widths = [max(len(row[i]) for row in full) for i in range(len(header))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [header, *rows]]


def format_tables(results: dict, summary: dict, comparison: dict) -> str:
    """The per-run table, the per-configuration statistics (mean, std, se over seeds, popularity beside) and the
    packed-against-padded block, as printed and written to the .txt."""
    runs = []
    for run, entry in results.items():
        if entry["status"] != "ok":
            runs.append([run, entry["status"]])
            continue
        test = entry.get("test", {}).get("model", {})
        runs.append([run, *(_cell(test.get(c), "{:.4f}") for c in COLUMNS),
                     *(_cell(entry.get(key), pattern) for key, _, pattern in TRAINING)])
    stats_rows = []
    for config, stats in summary.items():
        for statistic in ("mean", "std", "se"):
            stats_rows.append([config if statistic == "mean" else "", str(stats["n"]) if statistic == "mean" else "",
                               statistic, *(_cell(stats["test"][c][statistic], "{:.4f}") for c in COLUMNS),
                               *(_cell(stats[key][statistic], pattern) for key, _, pattern in TRAINING)])
        stats_rows.append(["  popularity", "", "mean", *(_cell(stats["popularity"][c], "{:.4f}") for c in COLUMNS),
                           *([""] * len(TRAINING))])
    compare_rows = [[name, f"{c['ndcg@10_packed']:.4f}", f"{c['ndcg@10_padded']:.4f}",
                     f"{c['ndcg@10_difference']:+.4f}", _cell(c["se_difference"], "{:.4f}"),
                     {None: "n/a", True: "yes", False: "no"}[c["within_one_se"]],
                     _cell(c["seconds_to_best_ratio"], "{:.2f}"), _cell(c["items_per_second_ratio"], "{:.2f}")]
                    for name, c in comparison.items()]
    lines = [*_table(["run", *HEADER], runs), "",
             *(["(tuning: test columns n/a where a variant was not chosen; its test split was never ranked)", ""]
               if any(e.get("variant") for e in results.values()) else []),
             "over seeds (std: ddof=1; se: std/sqrt(n)):",
             *_table(["configuration", "n", "stat", *HEADER], stats_rows)]
    ablation = ablation_rows(summary)
    if ablation:
        lines += ["", "ablations (test split; mean +- std over seeds; s to best and peak memory: means):",
                  *_table(["configuration", "variant", "n", "NDCG@10", "HR@10", "s to best", "peak GPU MiB",
                           "peak RSS MiB"], ablation)]
    chosen_rows = [[group, c["variant"] + ("" if c["complete"] else " (incomplete: seeds differ)"), str(c["n"]),
                    ", ".join(f"{variant} {value:.4f}" for variant, value in c["validation_ndcg@10"].items()),
                    _mean_std(c["test"]["ndcg@10"]), _mean_std(c["test"]["recall@10"])]
                   for group, c in choose_on_validation(summary).items()]
    if chosen_rows:
        lines += ["", "chosen on validation (best mean validation NDCG@10 over seeds; test: mean +- std of the chosen "
                      "variant only):",
                  *_table(["run", "chosen", "n", "validation NDCG@10 of each variant", "test NDCG@10", "test HR@10"],
                          chosen_rows)]
    if compare_rows:
        lines += ["", "packed vs padded (mean NDCG@10; se of the difference: sqrt(se_packed^2 + se_padded^2); "
                      "ratios packed/padded of the mean):",
                  *_table(["run", "packed", "padded", "difference", "se", "within 1 se", "s to best", "items/s"],
                          compare_rows)]
    return "\n".join(lines) + "\n"


def write_results(path: Path, results: dict, summary: dict, comparison: dict, text: str) -> None:
    """The JSON, merged into what an earlier invocation wrote there (so runs can be done in several goes; an entry of
    the same name is replaced; a file of the older flat layout, runs only, is kept as runs), and the .txt of this
    invocation's tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous = previous if "runs" in previous else {"runs": previous}
    sections = {"runs": results, "aggregate": summary, "comparison": comparison,
                "chosen_on_validation": choose_on_validation(summary)}
    path.write_text(json.dumps({key: {**previous.get(key, {}), **new} for key, new in sections.items()}, indent=2))
    path.with_suffix(".txt").write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    jobs = plan(args)
    # with --resume, runs that finished in an earlier call with the same flags are read, not trained again
    returncodes, signalled = run_queue([job for job in jobs if not job["finished"]], args.max_parallel,
                                       args.time_limit_s)
    returncodes.update((job["run"], 0) for job in jobs if job["finished"])
    results = {job["run"]: collect(job, returncodes[job["run"]], job["run"] in signalled) for job in jobs}
    rank_chosen_test(results, jobs)
    summary = aggregate(results)
    comparison = compare(summary)
    text = format_tables(results, summary, comparison)
    print(text, end="")
    write_results(Path(args.results), results, summary, comparison, text)
    print(f"wrote {args.results} and {Path(args.results).with_suffix('.txt')}")
    return 0 if all(entry["status"] == "ok" and "test_error" not in entry for entry in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
