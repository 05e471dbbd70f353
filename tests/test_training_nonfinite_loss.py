"""A diverging run stops with one error line, and no checkpoint of the diverged weights becomes ``latest``."""

import re

from blossomrec_hf.checkpointing import step_dirs

from train_helpers import TINY_MODEL, TRAIN, python_command, read_json, run_script, write_sequences_file


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    log = write_sequences_file(tmp_path / "log.txt")
    output_dir = tmp_path / "run"
    # One AdamW step of this size puts weights near 1e30: the next forward pass overflows float32.
    result = run_script(python_command(
        TRAIN, "--dataset", str(log), "--output_dir", str(output_dir), *TINY_MODEL, "--learning_rate", "1e30",
        "--per_device_train_batch_size", "8", "--max_steps", "6", "--save_steps", "1", "--logging_steps", "3"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    good = output_dir / "checkpoints" / "step-1"
    assert re.fullmatch(f"error: the training loss is (nan|inf|-inf) by step 2: stopped without saving the "
                        f"weights it produced; the last good checkpoint, {re.escape(str(good))}, is intact", last), last
    assert step_dirs(output_dir) == [good]
    assert read_json(good / "trainer_state.json")["global_step"] == 1
    assert not (output_dir / "metrics.json").exists()
