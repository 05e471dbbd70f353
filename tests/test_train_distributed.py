"""Two CPU processes (gloo) train as one process accumulating two batches: the same windows per step and, with the
loss normalised by the step's targets, the same gradients, so the same weights, losses and metrics. A checkpoint of
either resumes on the other. Every user is evaluated exactly once, with the same result as one process. Bad data
stops both processes with one error line."""

import re

import pytest

from train_helpers import (EVALUATE, TINY_MODEL, TRAIN, accelerate_command, assert_same_run, check, python_command,
                           read_json, run_script, write_sequences_file)

MAX_STEPS = 10  # 11 batches of 88 items per epoch: 6 steps of 2 batches, the last with one (and a padding batch)


def _train(log, output_dir, num_processes, *extra):
    """scripts/train.py on 1 process accumulating 2 batches, or on 2 processes: 2 batches per step either way."""
    accumulation = ["--gradient_accumulation_steps", "2"] if num_processes == 1 else []
    arguments = ["--dataset", str(log), "--output_dir", str(output_dir), *TINY_MODEL, "--hidden_dropout_prob", "0",
                 "--max_tokens_per_batch", "88", "--per_device_eval_batch_size", "8", "--max_steps", str(MAX_STEPS),
                 "--eval_steps", "4", "--logging_steps", "1", "--seed", "5", *accumulation, *extra]
    if num_processes == 1:  # without the launcher: seconds less
        return check(run_script(python_command(TRAIN, *arguments)))
    return check(run_script(accelerate_command(TRAIN, *arguments, num_processes=num_processes)))


def test_two_processes_train_as_one_and_resume_on_one_and_the_other_way(tmp_path):
    log = write_sequences_file(tmp_path / "log.txt", num_users=101)  # odd: evaluation batches split unevenly
    reference = tmp_path / "one"
    _train(log, reference, 1)
    # 2 -> 1: the first 4 steps (mid-epoch) on two processes, the rest on one
    two_then_one = tmp_path / "two-then-one"
    _train(log, two_then_one, 2, "--max_steps", "4")
    resumed = _train(log, two_then_one, 1, "--resume_from_checkpoint", "latest")
    assert "at step 4 (epoch 0)" in resumed.stdout
    assert_same_run(reference, two_then_one, MAX_STEPS)
    # 1 -> 2: the first 4 steps on one process, the rest (across the end of the epoch) on two
    one_then_two = tmp_path / "one-then-two"
    _train(log, one_then_two, 1, "--max_steps", "4")
    _train(log, one_then_two, 2, "--resume_from_checkpoint", "latest")
    assert_same_run(reference, one_then_two, MAX_STEPS)
    # the checkpoints record the batches per step that a resumed run must keep (tests/test_batching_steps.py: the
    # refusal of another number), and how the last run split them
    saved = read_json(one_then_two / "checkpoints" / f"step-{MAX_STEPS}" / "trainer_state.json")["run_config"]
    assert (saved["batches_per_step"], saved["num_processes"], saved["gradient_accumulation_steps"]) == (2, 2, 1)

    metrics = read_json(one_then_two / "metrics.json")
    assert metrics["num_processes"] == 2 and metrics["global_step"] == MAX_STEPS
    for split in ("validation", "test"):
        for method in ("model", "popularity"):
            assert metrics[split][method]["num_users"] == 101, (split, method)
    # One process ranking the saved model must find exactly what the two processes gathered.
    single = tmp_path / "single.json"
    check(run_script(python_command(EVALUATE, "--model", str(one_then_two), "--dataset", str(log),
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
