"""--output_dir: what the user did not ask to overwrite is refused in one line, before the data is read."""

import pytest

from blossomrec_hf.training.run_directory import check_output_dir, check_writable

from train_helpers import TRAIN, python_command, run_script


def _check(output_dir, dataset="synthetic", resuming=False, overwrite=False):
    check_output_dir(output_dir, dataset=str(dataset), resuming=resuming, overwrite=overwrite)


def test_a_folder_holding_a_saved_model_is_refused_unless_overwriting(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not empty \\(it holds a saved model\\); pass --overwrite_output_dir"):
        _check(tmp_path)
    _check(tmp_path, overwrite=True)
    _check(tmp_path, resuming=True)


def test_a_prepared_dataset_is_never_an_output_folder(tmp_path):
    (tmp_path / "prepared_data.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a prepared dataset"):
        _check(tmp_path, dataset="synthetic")
    for overwrite in (False, True):  # as the run's own dataset, not even with --overwrite_output_dir
        with pytest.raises(ValueError, match="is the dataset folder"):
            _check(tmp_path, dataset=tmp_path, overwrite=overwrite)


def test_any_other_content_is_named(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / name).write_text("mine")
    with pytest.raises(ValueError, match="it holds a.txt, b.txt, c.txt, ..."):
        _check(tmp_path)


def test_absent_and_empty_folders_are_fine(tmp_path):
    _check(tmp_path / "new" / "run")
    _check(tmp_path)


def test_a_file_or_an_unwritable_path_is_refused(tmp_path):
    (tmp_path / "file.txt").write_text("data")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        _check(tmp_path / "file.txt", overwrite=True)
    with pytest.raises(OSError, match="cannot be written \\(Not a directory\\)"):
        check_writable(tmp_path / "file.txt" / "run")
    check_writable(tmp_path / "new" / "run")
    assert list((tmp_path / "new" / "run").iterdir()) == []  # the probe leaves nothing behind


def test_train_refuses_a_saved_model_folder_before_reading_data(tmp_path):
    saved = tmp_path / "my-model"
    saved.mkdir()
    (saved / "config.json").write_text('{"mine": true}')
    (saved / "item_vocabulary.json").write_text('{"items": ["a"]}')
    missing = tmp_path / "missing.txt"  # read first, it would be the error
    result = run_script(python_command(TRAIN, "--dataset", str(missing), "--output_dir", str(saved)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: arguments: --output_dir {saved} is not empty (it holds a saved model); pass --overwrite_output_dir "
        f"to write over it, or choose another folder"]
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "item_vocabulary.json"]
    assert (saved / "config.json").read_text() == '{"mine": true}'
