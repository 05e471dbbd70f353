"""Interrupt a run with SIGTERM, resume it, and get the run that was never interrupted: same steps, losses, weights."""

import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from train_helpers import (REPO, TINY_MODEL, TRAIN, check, python_command, read_json, run_script, script_env,
                           write_sequences_file)

MAX_STEPS = 24


def _arguments(log, output_dir):
    # About 14 batches per epoch: the run crosses an epoch boundary, and dropout makes the RNG state matter.
    return ["--dataset", str(log), "--output_dir", str(output_dir), *TINY_MODEL, "--hidden_dropout_prob", "0.3",
            "--per_device_train_batch_size", "8", "--max_steps", str(MAX_STEPS), "--eval_steps", "8",
            "--save_steps", "1", "--save_total_limit", "3", "--logging_steps", "1", "--seed", "3"]


def _losses(output_dir):
    history = read_json(output_dir / "trainer_state.json")["log_history"]
    return {entry["step"]: entry["train/loss"] for entry in history if "train/loss" in entry}


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
    stopped_at = _checkpoint_steps(interrupted)[-1]
    assert 0 < stopped_at < MAX_STEPS
    assert not (interrupted / "metrics.json").exists()

    check(run_script(python_command(TRAIN, *_arguments(log, interrupted), "--resume_from_checkpoint", "latest")))
    assert read_json(interrupted / "trainer_state.json")["global_step"] == MAX_STEPS
    expected, resumed = _losses(reference), _losses(interrupted)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    assert resumed == pytest.approx(expected, rel=1e-5)

    final = f"checkpoints/step-{MAX_STEPS}/model.safetensors"
    reference_weights, resumed_weights = load_file(reference / final), load_file(interrupted / final)
    assert reference_weights.keys() == resumed_weights.keys()
    for name, tensor in reference_weights.items():
        assert resumed_weights[name] == pytest.approx(tensor, abs=1e-6), name
    test_metrics = read_json(reference / "metrics.json")["test"]["model"]
    assert read_json(interrupted / "metrics.json")["test"]["model"] == pytest.approx(test_metrics)
