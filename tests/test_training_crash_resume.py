"""Kill a run (os._exit, as kill -9 would) at three points of a checkpoint save, tear a saved state file by hand, and
resume each time: the run ends with the weights and losses of the run that was never interrupted."""

import sys

import pytest

from train_helpers import TINY_MODEL, TRAIN, assert_same_run, check, python_command, run_script, write_sequences_file

MAX_STEPS = 12

# scripts/train.py with one point of the save of checkpoint step-$CRASH_STEP patched to kill the process there.
CRASHING_TRAIN = r"""
import os, runpy, shutil, sys
import accelerate.checkpointing

point, staging = os.environ["CRASH_POINT"], f"step-{os.environ['CRASH_STEP']}.incomplete"
original_save, original_replace, original_rename, original_rmtree = (
    accelerate.checkpointing.save, os.replace, os.rename, shutil.rmtree)
renamed = []

def save(obj, f, *args, **kwargs):  # accelerate.save_state, half-way through writing optimizer.bin
    original_save(obj, f, *args, **kwargs)
    if point == "save_state" and f"/{staging}/optimizer.bin" in str(f):
        os.truncate(f, os.path.getsize(f) // 2)
        os._exit(137)

def replace(src, dst):  # trainer_state.json half-written
    if point == "trainer_state" and str(dst).endswith(f"/{staging}/trainer_state.json"):
        os.truncate(src, os.path.getsize(src) // 2)
        os._exit(137)
    original_replace(src, dst)

def rename(src, dst):
    renamed.append(str(src))
    original_rename(src, dst)

def rmtree(path, *args, **kwargs):  # an old checkpoint half-deleted, after the new one is in place
    if point == "prune" and any(name.endswith(staging) for name in renamed) and os.path.isdir(path):
        os.unlink(os.path.join(path, "model.safetensors"))
        os._exit(137)
    original_rmtree(path, *args, **kwargs)

accelerate.checkpointing.save, os.replace, os.rename, shutil.rmtree = save, replace, rename, rmtree
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _arguments(log, output_dir, *extra):
    return ["--dataset", str(log), "--output_dir", str(output_dir), *TINY_MODEL, "--hidden_dropout_prob", "0.3",
            "--per_device_train_batch_size", "8", "--max_steps", str(MAX_STEPS), "--eval_steps", "4",
            "--save_steps", "1", "--save_total_limit", "3", "--logging_steps", "1", "--seed", "3", *extra]


def _killed_at(point, step, arguments):
    env = {"CRASH_POINT": point, "CRASH_STEP": str(step)}
    result = run_script([sys.executable, "-c", CRASHING_TRAIN, TRAIN, *arguments], extra_env=env)
    assert result.returncode == 137, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _checkpoints(output_dir):
    return sorted(path.name for path in (output_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run killed three times and resumed."""
    root = tmp_path_factory.mktemp("crash")
    log = write_sequences_file(root / "log.txt", num_users=101)
    reference, crashed = root / "reference", root / "crashed"
    check(run_script(python_command(TRAIN, *_arguments(log, reference))))
    resume = ["--resume_from_checkpoint", "latest"]
    steps = {}

    _killed_at("save_state", 5, _arguments(log, crashed))
    steps["save_state"] = _checkpoints(crashed)
    # A state file torn as the non-atomic write of earlier versions (or a full disk) left it.
    (crashed / "checkpoints" / "step-4" / "trainer_state.json").write_bytes(b"")

    result = _killed_at("trainer_state", 7, _arguments(log, crashed, *resume))
    steps["torn"] = result
    steps["trainer_state"] = _checkpoints(crashed)

    _killed_at("prune", 10, _arguments(log, crashed, *resume))
    steps["prune"] = _checkpoints(crashed)

    steps["final"] = check(run_script(python_command(TRAIN, *_arguments(log, crashed, *resume))))
    return reference, crashed, log, steps


def test_each_kill_leaves_only_whole_checkpoints_named_as_such(runs):
    _, _, _, steps = runs
    assert steps["save_state"] == ["step-2", "step-3", "step-4", "step-5.incomplete"]
    assert steps["trainer_state"] == ["step-4", "step-5", "step-6", "step-7.incomplete"]
    assert steps["prune"] == ["step-10", "step-7.deleting", "step-8", "step-9"]


def test_latest_skips_the_torn_state_with_a_warning_naming_it(runs):
    _, crashed, _, steps = runs
    warnings = [line for line in steps["torn"].stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipping incomplete checkpoint {crashed / 'checkpoints' / 'step-4'} "
                        f"(trainer_state.json is empty or cut off)"]
    assert f"resumed from {crashed / 'checkpoints' / 'step-3'} at step 3" in steps["torn"].stdout


def test_resumed_run_ends_with_the_uninterrupted_weights_and_losses(runs):
    reference, crashed, _, steps = runs
    assert f"resumed from {crashed / 'checkpoints' / 'step-10'} at step 10" in steps["final"].stdout
    assert _checkpoints(crashed) == ["step-10", "step-11", "step-12"]  # the kills' leftovers are gone
    assert_same_run(reference, crashed, MAX_STEPS)


def test_resuming_with_another_hidden_size_names_the_field(runs):
    _, crashed, log, _ = runs
    arguments = _arguments(log, crashed, "--resume_from_checkpoint", "latest")
    arguments[arguments.index("--hidden_size") + 1] = "64"
    result = run_script(python_command(TRAIN, *arguments))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --resume_from_checkpoint: ") and "hidden_size 32 (now 64)" in last
