"""scripts/benchmark_quality.py on the CPU: real train.py runs on a tiny synthetic log with tiny model flags in
--extra (seeds x layouts, statistics over seeds, packed vs padded), a failing run, and the process queue."""

import json
import math
import random
import statistics
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, script_module

SCRIPT = REPO_ROOT / "scripts" / "benchmark_quality.py"
TINY = ("--num_train_epochs 2 --max_seq_length 10 --per_device_train_batch_size 16 --hidden_size 16 "
        "--num_hidden_layers 1 --num_attention_heads 2 --num_key_value_heads 1 --intermediate_size 16")
TRAINING_KEYS = ["best_epoch", "train_seconds_to_best", "train_items_per_second"]


@pytest.fixture(scope="module")
def quality_benchmark():
    yield from script_module("scripts/benchmark_quality.py", "benchmark_quality")


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A Beauty.txt in the S3Rec layout (`user item item ...`, items in time order): 60 users over 30 items."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # four runs share the CI machine's few cores
    rng = random.Random(0)
    lines = [" ".join(str(token) for token in [user, *rng.sample(range(1, 31), rng.randint(5, 10))])
             for user in range(1, 61)]
    (tmp_path / "Beauty.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_seeds_and_layouts_are_aggregated_and_compared(quality_benchmark, data_dir, tmp_path, capsys):
    results = tmp_path / "results" / "quality.json"
    code = quality_benchmark.main([
        "--runs", "beauty-blossom", "--seeds", "0", "1", "--layouts", "packed", "padded", "--max_parallel", "4",
        "--data_dir", str(data_dir), "--output_root", str(tmp_path / "runs"), "--results", str(results),
        "--extra", TINY])
    printed = capsys.readouterr().out
    assert code == 0, printed

    written = json.loads(results.read_text())
    runs = written["runs"]
    assert set(runs) == {"beauty-blossom-seed0", "beauty-blossom-seed1",
                         "beauty-blossom-padded-seed0", "beauty-blossom-padded-seed1"}
    for run, entry in runs.items():
        assert entry["status"] == "ok", entry
        assert f"--seed {entry['seed']}" in entry["command"] and run.endswith(f"-seed{entry['seed']}")
        assert ("--max_tokens_per_batch 0" in entry["command"]) == (entry["layout"] == "padded")

    for config, layout in (("beauty-blossom", "packed"), ("beauty-blossom-padded", "padded")):
        stats = written["aggregate"][config]
        members = [e for e in runs.values() if e["config"] == config]
        assert stats["n"] == 2 and stats["layout"] == layout and sorted(stats["seeds"]) == [0, 1]
        values = {c: [e["test"]["model"][c] for e in members] for c in quality_benchmark.COLUMNS}
        values.update({key: [e[key] for e in members] for key in TRAINING_KEYS})
        for key, numbers in values.items():
            got = stats["test"][key] if key in quality_benchmark.COLUMNS else stats[key]
            assert got["mean"] == pytest.approx(statistics.fmean(numbers))
            assert got["std"] == pytest.approx(statistics.stdev(numbers))
            assert got["se"] == pytest.approx(statistics.stdev(numbers) / math.sqrt(2))

    packed, padded = written["aggregate"]["beauty-blossom"], written["aggregate"]["beauty-blossom-padded"]
    comparison = written["comparison"]["beauty-blossom"]
    difference = packed["test"]["ndcg@10"]["mean"] - padded["test"]["ndcg@10"]["mean"]
    se = math.sqrt(packed["test"]["ndcg@10"]["se"] ** 2 + padded["test"]["ndcg@10"]["se"] ** 2)
    assert comparison["ndcg@10_difference"] == pytest.approx(difference)
    assert comparison["se_difference"] == pytest.approx(se)
    assert comparison["within_one_se"] == (abs(difference) <= se)
    assert comparison["seconds_to_best_ratio"] == pytest.approx(
        packed["train_seconds_to_best"]["mean"] / padded["train_seconds_to_best"]["mean"])
    assert comparison["items_per_second_ratio"] == pytest.approx(
        packed["train_items_per_second"]["mean"] / padded["train_items_per_second"]["mean"])

    text = results.with_suffix(".txt").read_text()
    assert text in printed and "over seeds" in text and "packed vs padded" in text

    # --resume in a later call: every run had finished, so each is read (peak memory included), none trained again
    again = quality_benchmark.main([
        "--runs", "beauty-blossom", "--seeds", "0", "1", "--layouts", "packed", "padded", "--resume",
        "--data_dir", str(data_dir), "--output_root", str(tmp_path / "runs"), "--results", str(results),
        "--extra", TINY])
    assert again == 0 and "$ " not in capsys.readouterr().out
    assert json.loads(results.read_text())["runs"] == runs


def test_a_failed_run_is_one_line_and_exit_code_1(data_dir, tmp_path):
    results = tmp_path / "quality.json"
    finished = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", "beauty-dense", "--max_parallel", "1", "--data_dir", str(data_dir),
         "--output_root", str(tmp_path / "runs"), "--results", str(results), "--extra", "--no_such_flag 1"],
        capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1, finished.stdout + finished.stderr

    entry = json.loads(results.read_text())["runs"]["beauty-dense-seed42"]
    assert entry["status"].startswith("failed (exit ") and "\n" not in entry["status"]
    assert f"beauty-dense-seed42  {entry['status']}" in finished.stdout.splitlines()
    assert "no_such_flag" in (tmp_path / "runs" / "beauty-dense-seed42.log").read_text()


def _job(tmp_path, name: str, code: str) -> dict:
    command = [sys.executable, "-c", code]
    return {"run": name, "output_dir": tmp_path / name, "resume": False, "training": command, "command": command}


def test_the_queue_runs_at_most_max_parallel_and_stops_at_the_time_limit(quality_benchmark, tmp_path):
    record = ("import time; start = time.time(); time.sleep(0.3); "
              "open({path!r}, 'w').write(f'{{start}} {{time.time()}}')")
    jobs = [_job(tmp_path, f"job{i}", record.format(path=str(tmp_path / f"job{i}.times"))) for i in range(3)]
    jobs.append(_job(tmp_path, "fails", "raise SystemExit(3)"))
    returncodes, signalled = quality_benchmark.run_queue(jobs, max_parallel=1)
    assert returncodes == {"job0": 0, "job1": 0, "job2": 0, "fails": 3} and not signalled
    intervals = sorted(tuple(map(float, (tmp_path / f"job{i}.times").read_text().split())) for i in range(3))
    assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:]))

    jobs = [_job(tmp_path, "long", "import time; time.sleep(60)"), _job(tmp_path, "queued", "pass")]
    returncodes, signalled = quality_benchmark.run_queue(jobs, max_parallel=1, time_limit_s=0.5)
    assert signalled == {"long"} and returncodes["long"] != 0 and returncodes["queued"] is None


def test_variants_are_chosen_on_validation_only(quality_benchmark, data_dir, tmp_path, capsys):
    results = tmp_path / "variants.json"
    code = quality_benchmark.main([
        "--runs", "beauty-blossom", "--seeds", "0", "1", "--max_parallel", "4", "--data_dir", str(data_dir),
        "--output_root", str(tmp_path / "runs"), "--results", str(results), "--extra", TINY,
        "--variants", "base=", "drop1=--hidden_dropout_prob 0.1"])
    assert code == 0, capsys.readouterr().out
    written = json.loads(results.read_text())
    assert set(written["aggregate"]) == {"beauty-blossom-base", "beauty-blossom-drop1"}
    for entry in written["runs"].values():
        assert ("--hidden_dropout_prob 0.1" in entry["command"]) == (entry["variant"] == "drop1")
    validation = {variant: statistics.fmean(e["validation"]["model"]["ndcg@10"] for e in written["runs"].values()
                                            if e["variant"] == variant) for variant in ("base", "drop1")}
    chosen = written["chosen_on_validation"]["beauty-blossom"]
    assert chosen["variant"] == max(validation, key=validation.get)
    assert chosen["validation_ndcg@10"] == pytest.approx(validation)
    assert chosen["test"] == written["aggregate"][f"beauty-blossom-{chosen['variant']}"]["test"]
    assert chosen["complete"] and "chosen on validation" in results.with_suffix(".txt").read_text()
    # no run ranks its test split while training; evaluate.py ranks the chosen variant's runs only, afterwards
    for run, entry in written["runs"].items():
        assert "--do_predict false" in entry["command"]
        assert ("test" in entry) == (entry["variant"] == chosen["variant"]), run
        assert (tmp_path / "runs" / run / "test_metrics.json").exists() == ("test" in entry)
    tested = [e for e in written["runs"].values() if "test" in e]
    assert chosen["test"]["ndcg@10"]["mean"] == pytest.approx(statistics.fmean(e["test"]["model"]["ndcg@10"]
                                                                                for e in tested))
    capsys.readouterr()

    # --resume with a variant's flags changed under the same name: its runs are trained again, the others read
    assert quality_benchmark.main([
        "--runs", "beauty-blossom", "--seeds", "0", "1", "--data_dir", str(data_dir), "--resume",
        "--output_root", str(tmp_path / "runs"), "--results", str(results), "--extra", TINY,
        "--variants", "base=", "drop1=--hidden_dropout_prob 0.2"]) == 0
    launched = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ") and "train.py" in line]
    assert len(launched) == 2 and all("--hidden_dropout_prob 0.2" in line for line in launched)


@pytest.mark.parametrize("spec", ["Bad=--x", "a b=--x", "=--x"])
def test_a_bad_variant_is_one_usage_error(quality_benchmark, spec, capsys):
    with pytest.raises(SystemExit) as stopped:
        quality_benchmark.parse_args(["--variants", spec])
    assert stopped.value.code == 2 and "--variants" in capsys.readouterr().err


def test_an_incomplete_choice_ranks_no_test_split(quality_benchmark, tmp_path, monkeypatch):
    """Variant a won on the one seed it finished; b finished both. Ranking a's test split now would let a later
    --resume, once a's second seed is done and b wins, rank a second variant's: nothing is ranked until the seeds
    agree."""
    metrics = {c: 0.1 for c in quality_benchmark.COLUMNS}

    def entry(variant, seed, status, ndcg):
        return {"config": f"beauty-blossom-{variant}", "name": "beauty-blossom", "layout": "packed",
                "variant": variant, "seed": seed, "status": status,
                **({"validation": {"model": {**metrics, "ndcg@10": ndcg}}} if status == "ok" else {})}

    results = {"a0": entry("a", 0, "ok", 0.30), "a1": entry("a", 1, "not started: --time_limit_s reached", 0),
               "b0": entry("b", 0, "ok", 0.20), "b1": entry("b", 1, "ok", 0.25)}
    jobs = [{"run": run, "output_dir": tmp_path / run} for run in results]
    launched = []
    monkeypatch.setattr(quality_benchmark.subprocess, "run", lambda command, **_: launched.append(command))
    chosen = quality_benchmark.choose_on_validation(quality_benchmark.aggregate(results))["beauty-blossom"]
    assert chosen["variant"] == "a" and not chosen["complete"]
    quality_benchmark.rank_chosen_test(results, jobs)
    assert launched == [] and not any("test" in e for e in results.values())
