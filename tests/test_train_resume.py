"""Interrupt a run with SIGTERM (anywhere, then exactly at a step due for evaluation), resume it, and get the run
that was never interrupted: same steps, losses, validation results, weights."""

import signal
import subprocess
import sys
import time

import pytest

from train_helpers import (REPO, TINY_MODEL, TRAIN, assert_same_run, check, python_command, read_json, run_script,
                           script_env, write_sequences_file)

MAX_STEPS = 24
SIGNALLED_STEP = 16  # a step due for evaluation (--eval_steps 8)

# scripts/train.py sending itself SIGTERM during the optimizer step that makes global_step $SIGNAL_AT.
SIGNALLED_TRAIN = r"""
import os, runpy, signal, sys
from blossomrec_hf.training.trainer import Trainer

original_step = Trainer.training_step

def training_step(self, batch):
    if self.state.global_step + 1 == int(os.environ["SIGNAL_AT"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return original_step(self, batch)

Trainer.training_step = training_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _arguments(log, output_dir):
    # About 14 batches per epoch: the run crosses an epoch boundary, and dropout makes the RNG state matter.
    return ["--dataset", str(log), "--output_dir", str(output_dir), *TINY_MODEL, "--hidden_dropout_prob", "0.3",
            "--per_device_train_batch_size", "8", "--max_steps", str(MAX_STEPS), "--eval_steps", "8",
            "--save_steps", "1", "--save_total_limit", "3", "--logging_steps", "1", "--seed", "3"]


def _validations(output_dir):
    history = read_json(output_dir / "trainer_state.json")["log_history"]
    return [entry for entry in history if "validation/ndcg@10" in entry]


def _checkpoint_steps(output_dir):
    names = [p.parent.name[5:] for p in (output_dir / "checkpoints").glob("step-*/trainer_state.json")]
    return sorted(int(name) for name in names if name.isdigit())  # not step-N.incomplete, a save in progress


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    log = write_sequences_file(tmp_path / "log.txt", num_users=101)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    check(run_script(python_command(TRAIN, *_arguments(log, reference))))

    process = subprocess.Popen(python_command(TRAIN, *_arguments(log, interrupted)), env=script_env(), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not _checkpoint_steps(interrupted) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, f"exit {process.returncode}\n{stdout}\n{stderr}"
    assert "stopped by signal" in stdout + stderr
    assert "stopping: a checkpoint is saved at the next step boundary" in stdout
    stopped_at = _checkpoint_steps(interrupted)[-1]
    assert 0 < stopped_at < SIGNALLED_STEP
    assert not (interrupted / "metrics.json").exists()

    # Stopped at a step due for evaluation: the checkpoint is written without waiting for the evaluation, which the
    # resumed run does first.
    resume = [*_arguments(log, interrupted), "--resume_from_checkpoint", "latest"]
    result = run_script([sys.executable, "-c", SIGNALLED_TRAIN, TRAIN, *resume],
                        extra_env={"SIGNAL_AT": str(SIGNALLED_STEP)})
    assert result.returncode == 128 + signal.SIGTERM, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert f"stopped by signal at step {SIGNALLED_STEP}" in result.stdout
    assert f"step {SIGNALLED_STEP} (epoch" not in result.stdout + result.stderr  # no validation line
    assert _checkpoint_steps(interrupted)[-1] == SIGNALLED_STEP
    assert read_json(interrupted / f"checkpoints/step-{SIGNALLED_STEP}/trainer_state.json")["evaluation_pending"]

    resumed_run = check(run_script(python_command(TRAIN, *resume)))
    assert f"step {SIGNALLED_STEP} (epoch" in resumed_run.stdout + resumed_run.stderr
    assert read_json(interrupted / "trainer_state.json")["global_step"] == MAX_STEPS
    assert_same_run(reference, interrupted, MAX_STEPS)
    assert _validations(interrupted) == [pytest.approx(entry, rel=1e-5) for entry in _validations(reference)]
