"""Data that cannot be trained on is one ``error:`` line and exit status 2 (no traceback), and repeated events are
one ``warning:`` line, in scripts/train.py and scripts/evaluate.py."""

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.data import ItemVocabulary, prepare_data

from train_helpers import EVALUATE, TRAIN, python_command, run_script

# Pairs (user item per line); line 3 repeats line 2. User u1 has 3 events, so a validation and a test target but a
# training history of 1 item; u2 has 1 event.
REPEATED_PAIRS = "u1 i1\nu1 i2\nu1 i2\nu2 i1\n"
REPEAT_WARNING = ("warning: {}: 1 line(s) repeat an earlier line exactly (first at line 3); kept as repeated "
                  "interactions")


def _stderr_lines(result):
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()


def test_a_prepared_folder_without_users_to_evaluate_is_one_error_line(tmp_path):
    log = tmp_path / "short.txt"
    log.write_text("u1 i1 i2\nu2 i2 i3\nu3 i1 i3\n")  # every user has 2 events: nobody can be evaluated
    prepared = tmp_path / "prepared"
    prepare_data(str(log), min_history_length=2).save(prepared)  # prepare_data.py itself would refuse it
    result = run_script(python_command(TRAIN, "--dataset", str(prepared), "--output_dir", str(tmp_path / "run"),
                                       "--min_history_length", "2"))
    assert result.returncode == 2
    assert _stderr_lines(result) == [
        f"error: dataset '{prepared}': no user has the 3 events that a validation and a test target need: the 3 "
        f"users kept (min_history_length=2) have at most 2 events"]


def test_train_warns_once_about_repeated_events_then_refuses_data_without_training_windows(tmp_path):
    log = tmp_path / "pairs.txt"
    log.write_text(REPEATED_PAIRS)
    result = run_script(python_command(TRAIN, "--dataset", str(log), "--output_dir", str(tmp_path / "run")))
    assert result.returncode == 2
    assert _stderr_lines(result) == [
        REPEAT_WARNING.format(log),
        f"error: dataset '{log}': no training windows (every training history has fewer than 2 items): a user's last "
        f"2 events are the validation and test targets, so a user with n >= 3 events trains on n - 2, and the 1 "
        f"users kept (min_history_length=3) have at most 3 events"]


def test_evaluate_warns_once_about_repeated_events(tmp_path):
    log = tmp_path / "pairs.txt"
    log.write_text(REPEATED_PAIRS)
    model_dir = tmp_path / "model"
    config = BlossomRecConfig(n_items=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=32)
    BlossomRecForSequentialRecommendation(config).save_pretrained(model_dir)
    ItemVocabulary(["a", "b", "c"]).save_pretrained(model_dir)
    result = run_script(python_command(EVALUATE, "--model", str(model_dir), "--dataset", str(log)))
    assert result.returncode == 2
    assert _stderr_lines(result) == [
        REPEAT_WARNING.format(log),
        f"error: dataset '{log}': its item vocabulary (2 items) differs from the model's (3 items); evaluate on the "
        f"data the model was trained on, with the same --k_core and --min_history_length"]


def test_tf32_without_a_gpu_that_has_it_is_one_error_line(tmp_path):
    result = run_script(python_command(TRAIN, "--tf32", "true", "--max_steps", "1",
                                       "--output_dir", str(tmp_path / "run")))
    assert result.returncode == 2
    assert _stderr_lines(result)[-1] == ("error: arguments: --tf32 needs a CUDA GPU of compute capability 8.0 or "
                                         "newer; this run trains on cpu")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_bad_evaluation_batch_size_is_one_error_line(tmp_path):
    result = run_script(python_command(TRAIN, "--per_device_eval_batch_size", "0", "--max_steps", "1",
                                       "--output_dir", str(tmp_path / "run")))
    assert result.returncode == 2
    assert _stderr_lines(result)[-1] == "error: arguments: --per_device_eval_batch_size must be a positive int, got 0"
