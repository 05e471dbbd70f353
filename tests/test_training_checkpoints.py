"""Checkpoints on disk, in-process: whole or absent, torn and half-deleted ones skipped, RNG state required, settings
compared, and a full disk that leaves the previous state readable."""

import errno
import json
import os
import shutil

import pytest

from blossomrec_hf import checkpointing
from blossomrec_hf.checkpointing import (STATE_FILE, TrainerState, check_same_run, checkpoint_files,
                                         checkpoint_problem, remove_tree, resolve_checkpoint, save_checkpoint,
                                         step_dirs)
from blossomrec_hf.errors import user_input_errors


class OneProcess:
    """What ``save_checkpoint`` uses of an ``Accelerator``; ``save_state`` writes the files accelerate 1.16 writes."""

    is_main_process, num_processes, scaler = True, 1, None

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        for name in checkpoint_files(self):
            with open(os.path.join(path, name), "wb") as file:
                file.write(b"state")


REQUIRED = checkpoint_files(OneProcess())


def _save_steps(output_dir, steps, total_limit=10):
    for step in steps:
        save_checkpoint(OneProcess(), output_dir, TrainerState(global_step=step), total_limit)


def _names(output_dir):
    return sorted(path.name for path in (output_dir / "checkpoints").iterdir())


def test_checkpoints_are_whole_and_the_oldest_are_pruned(tmp_path):
    _save_steps(tmp_path, range(1, 5), total_limit=2)
    assert _names(tmp_path) == ["step-3", "step-4"]  # no step-N.incomplete or step-N.deleting left over
    assert all(checkpoint_problem(path, REQUIRED) is None for path in step_dirs(tmp_path))


@pytest.mark.parametrize("torn", [b"", b'{"global_step": 3, "epo'], ids=["zero-bytes", "cut-off"])
def test_latest_skips_a_torn_trainer_state_and_names_it(tmp_path, torn):
    _save_steps(tmp_path, [1, 2, 3])
    (tmp_path / "checkpoints" / "step-3" / STATE_FILE).write_bytes(torn)
    path, warnings = resolve_checkpoint(tmp_path, "latest", REQUIRED)
    assert path.name == "step-2"
    assert warnings == [f"warning: skipping incomplete checkpoint {tmp_path / 'checkpoints' / 'step-3'} "
                        f"({STATE_FILE} is empty or cut off)"]


def test_a_half_deleted_checkpoint_does_not_count(tmp_path, monkeypatch):
    _save_steps(tmp_path, [1, 2, 3, 4])
    # Deleted in place by a tool that does not rename first: the state file survived, the weights did not.
    for name in ("model.safetensors", "optimizer.bin"):
        (tmp_path / "checkpoints" / "step-4" / name).unlink()
    assert checkpoint_problem(tmp_path / "checkpoints" / "step-4", REQUIRED) == \
        "missing model.safetensors, optimizer.bin"

    # remove_tree killed inside rmtree: the half-deleted folder is step-3.deleting, which is never a checkpoint.
    def killed_rmtree(path, ignore_errors=False):
        if os.path.exists(path):
            os.unlink(os.path.join(path, "scheduler.bin"))
            raise SystemExit("killed")
    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(SystemExit):
        remove_tree(tmp_path / "checkpoints" / "step-3")
    monkeypatch.undo()
    assert [p.name for p in step_dirs(tmp_path)] == ["step-1", "step-2", "step-4"]
    path, warnings = resolve_checkpoint(tmp_path, "latest", REQUIRED)
    assert path.name == "step-2" and len(warnings) == 1 and "step-4" in warnings[0]
    _save_steps(tmp_path, [5], total_limit=2)  # the next save clears what the kill left, and damaged step-4
    assert _names(tmp_path) == ["step-2", "step-5"]


def test_a_checkpoint_without_its_rng_state_is_refused_by_name(tmp_path, capsys):
    _save_steps(tmp_path, [1])
    checkpoint = tmp_path / "checkpoints" / "step-1"
    (checkpoint / "random_states_0.pkl").unlink()
    with pytest.raises(SystemExit) as exit_info, user_input_errors("arguments"):
        resolve_checkpoint(tmp_path, str(checkpoint), REQUIRED)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and "missing random_states_0.pkl" in error
    with pytest.raises(FileNotFoundError, match="step-1 is incomplete \\(missing random_states_0.pkl\\)"):
        resolve_checkpoint(tmp_path, "latest", REQUIRED)


def test_a_checkpoint_of_fewer_processes_lacks_their_rng_state(tmp_path):
    _save_steps(tmp_path, [1])
    two_processes = type("TwoProcesses", (OneProcess,), {"num_processes": 2})()
    problem = checkpoint_problem(tmp_path / "checkpoints" / "step-1", checkpoint_files(two_processes))
    assert problem == "missing random_states_1.pkl"


def test_resaving_an_older_step_drops_the_abandoned_newer_checkpoints(tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4])
    _save_steps(tmp_path, [2])  # a run resumed from step-1 reaches step 2 again
    assert _names(tmp_path) == ["step-1", "step-2"]
    assert resolve_checkpoint(tmp_path, "latest", REQUIRED)[0].name == "step-2"


def test_a_full_disk_leaves_the_previous_state_readable(tmp_path, monkeypatch):
    path = tmp_path / STATE_FILE
    TrainerState(global_step=7).save(path)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpointing.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        TrainerState(global_step=8, log_history=[{"step": 8}] * 1000).save(path)
    monkeypatch.undo()
    assert TrainerState.load(path).global_step == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # the temporary file is gone
    assert json.loads(path.read_text())["global_step"] == 7


def test_resuming_with_other_settings_names_every_difference():
    saved = {"hidden_size": 32, "stis_window": 2, "seed": 3}
    with pytest.raises(ValueError) as error:
        check_same_run("run/checkpoints/step-8", saved, {**saved, "hidden_size": 64, "stis_window": 4})
    message = str(error.value)
    assert "hidden_size 32 (now 64), stis_window 2 (now 4)" in message and "seed" not in message
    check_same_run("run/checkpoints/step-8", saved, dict(saved))
    check_same_run("old/checkpoints/step-8", None, saved)  # checkpoints written before settings were recorded


def test_settings_newer_than_the_checkpoint_pass_at_their_defaults():
    saved = {"hidden_size": 32, "seed": 3}  # written before gate_type existed
    defaults = {"gate_type": "learned", "hidden_size": 128}
    check_same_run("run/checkpoints/step-8", saved, {**saved, "gate_type": "learned"}, defaults=defaults)
    with pytest.raises(ValueError, match=r"gate_type 'learned' \(now 'fixed'\)"):
        check_same_run("run/checkpoints/step-8", saved, {**saved, "gate_type": "fixed"}, defaults=defaults)
