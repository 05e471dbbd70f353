"""Two CPU processes (gloo) train and evaluate; every user is evaluated exactly once, with the same result as one."""

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
