"""Shared pieces of the training-script tests: a tiny learnable log file, tiny model flags, and script runners."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "scripts" / "train.py")
EVALUATE = str(REPO / "scripts" / "evaluate.py")

# A model small enough for a CPU test run of a few seconds.
TINY_MODEL = ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
              "--num_key_value_heads", "1", "--intermediate_size", "64", "--max_seq_length", "12",
              "--compress_block_size", "4", "--compress_stride", "2", "--selection_block_size", "4",
              "--num_selected_blocks", "2", "--stis_window", "2"]


def write_sequences_file(path: Path, num_users: int = 101, num_items: int = 40, seed: int = 0) -> Path:
    """An S3Rec-style log (``user item item ...`` per line) where each user walks one of four item cycles."""
    rng = random.Random(seed)
    lines = []
    for user in range(num_users):
        cycle = [item for item in range(1, num_items + 1) if item % 4 == user % 4]
        position = rng.randrange(len(cycle))
        items = []
        for _ in range(rng.randint(5, 16)):
            items.append(cycle[position % len(cycle)] if rng.random() < 0.9 else rng.randint(1, num_items))
            position += 1
        lines.append(" ".join(map(str, [f"u{user}", *(f"i{item}" for item in items)])))
    path.write_text("\n".join(lines) + "\n")
    return path


def script_env(**extra: str) -> dict:
    """The test process's environment, with the package importable from src/ and one CPU thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env.update({"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false"}, **extra)
    return env


def run_script(command: list[str], timeout: float = 120, cwd: Path = REPO,
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run to completion; on timeout, kill the whole process group (a launcher and all its workers)."""
    process = subprocess.Popen(command, env=script_env(**(extra_env or {})), cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"timed out after {timeout} s: {command}\nstdout:\n{stdout}\nstderr:\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def python_command(script: str, *args: str) -> list[str]:
    return [sys.executable, script, *args]


def accelerate_command(script: str, *args: str, num_processes: int = 1, quiet: bool = False) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", *(["-q"] if quiet else []), "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes > 1:
        # with ACCELERATE_USE_CPU=true: several CPU processes over gloo; a port of their own, since tests run in
        # parallel (pytest-xdist) and two launches on the default port would meet
        launch += ["--multi_gpu", "--main_process_port", str(free_port())]
    return [*launch, script, *args]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def logged_losses(output_dir: Path) -> dict[int, float]:
    """The training loss logged at each step, from the run's final trainer_state.json."""
    history = read_json(Path(output_dir) / "trainer_state.json")["log_history"]
    return {entry["step"]: entry["train/loss"] for entry in history if "train/loss" in entry}


def assert_same_run(reference: Path, resumed: Path, max_steps: int) -> None:
    """The interrupted and resumed run ended as the reference run did: a loss logged at every step and the same
    losses, the same weights in the last checkpoint, the same test metrics."""
    from safetensors.torch import load_file

    losses = logged_losses(resumed)
    assert sorted(losses) == list(range(1, max_steps + 1))
    assert losses == pytest.approx(logged_losses(reference), rel=1e-5)
    final = f"checkpoints/step-{max_steps}/model.safetensors"
    expected, actual = load_file(Path(reference) / final), load_file(Path(resumed) / final)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name] == pytest.approx(tensor, abs=1e-6), name
    for method in ("model", "popularity"):
        expected_metrics = read_json(Path(reference) / "metrics.json")["test"][method]
        assert read_json(Path(resumed) / "metrics.json")["test"][method] == pytest.approx(expected_metrics), method
