"""Two CPU processes (gloo) train and evaluate; every user is evaluated exactly once, with the same result as one.
Bad data stops both processes with one error line."""

import re

import pytest

from train_helpers import (EVALUATE, TINY_MODEL, TRAIN, accelerate_command, check, python_command, read_json,
                           run_script, write_sequences_file)


def test_two_process_run_counts_every_user_once(tmp_path):
    log = write_sequences_file(tmp_path / "log.txt", num_users=101)  # odd: the last batch is padded by sharding
    out = tmp_path / "run"
    check(run_script(accelerate_command(
        TRAIN, "--dataset", str(log), "--output_dir", str(out), *TINY_MODEL, "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "8", "--max_steps", "6", "--eval_steps", "3", "--logging_steps", "2",
        num_processes=2)))
    metrics = read_json(out / "metrics.json")
    assert metrics["num_processes"] == 2
    for split in ("validation", "test"):
        for method in ("model", "popularity"):
            assert metrics[split][method]["num_users"] == 101, (split, method)

    # One process ranking the saved model must find exactly what the two processes gathered.
    single = tmp_path / "single.json"
    check(run_script(python_command(EVALUATE, "--model", str(out), "--dataset", str(log),
                                    "--output_file", str(single))))
    evaluated = read_json(single)["metrics"]
    for method in ("model", "popularity"):
        assert evaluated[method] == pytest.approx(metrics["test"][method], abs=1e-6)


def test_bad_data_stops_both_processes_with_one_error_line(tmp_path):
    log = tmp_path / "short.txt"
    log.write_text("u1 i1 i2\nu2 i2 i3\n")  # nobody has the 3 events evaluation needs
    result = run_script(accelerate_command(TRAIN, "--dataset", str(log), "--output_dir", str(tmp_path / "run"),
                                           "--min_history_length", "2", num_processes=2, quiet=True))
    assert result.returncode == 1  # the launcher's status for a failed worker
    # No worker traceback. (accelerate 1.15's launcher, unlike 1.16's, still prints its own ChildFailedError
    # traceback under -q with several processes; no line of it comes from the script.)
    assert "[rank" not in result.stderr and "blossomrec_hf" not in result.stderr, result.stderr
    assert 'File "' + str(TRAIN) not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: dataset '{log}': no user has the 3 events that a validation and a test target need: "
                      f"the 2 users kept (min_history_length=2) have at most 2 events"]
    # torchrun's summary lists each failed worker with its exit status: 2 (bad input), or -15 for a worker that the
    # launcher's SIGTERM reached first, once the other had exited.
    statuses = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\n\s*exitcode\s*: (-?\d+)", result.stderr))
    assert "2" in statuses.values() and set(statuses.values()) <= {"2", "-15"}, statuses
