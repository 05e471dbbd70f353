"""A full disk while a checkpoint is written: one ``error:`` line naming the checkpoint and the OS error, exit status
1, and the previous checkpoint whole and resumable."""

import sys

from blossomrec_hf.checkpointing import STATE_FILE, checkpoint_problem, step_dirs

from train_helpers import TINY_MODEL, TRAIN, read_json, run_script, write_sequences_file

# scripts/train.py with accelerate's save_state failing as on a full disk from its second call on, after writing
# part of the checkpoint.
DISK_FULL_TRAIN = r"""
import errno, os, runpy, sys
import accelerate

original_save_state, calls = accelerate.Accelerator.save_state, []

def save_state(self, output_dir=None, **kwargs):
    calls.append(output_dir)
    if len(calls) >= 2:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "model.safetensors"), "wb") as file:
            file.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return original_save_state(self, output_dir, **kwargs)

accelerate.Accelerator.save_state = save_state
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_in_save_state_is_one_error_line_and_keeps_the_previous_checkpoint(tmp_path):
    log = write_sequences_file(tmp_path / "log.txt")
    output_dir = tmp_path / "run"
    result = run_script([sys.executable, "-c", DISK_FULL_TRAIN, TRAIN, "--dataset", str(log), "--output_dir",
                         str(output_dir), *TINY_MODEL, "--per_device_train_batch_size", "8", "--max_steps", "4",
                         "--save_steps", "1", "--eval_steps", "4"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    checkpoints = output_dir / "checkpoints"
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: could not write checkpoint {checkpoints / 'step-2'}: No space left on device; stopped; the last "
        f"good checkpoint, {checkpoints / 'step-1'}, is intact")
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-1"]  # the partial step-2 is gone
    required = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"]
    assert step_dirs(output_dir) == [checkpoints / "step-1"]
    assert checkpoint_problem(checkpoints / "step-1", required) is None
    assert read_json(checkpoints / "step-1" / STATE_FILE)["global_step"] == 1
