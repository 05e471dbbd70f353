"""Bad data through scripts/prepare_data.py: each bad file gives one line on stderr and the right exit status, and
leaves nothing written (the prepared folder is written atomically).

The table runs the script's main() in-process (a subprocess pays ~2 s of imports per case); two cases also run as a
real subprocess, to check the exit status the shell sees.
"""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blossomrec_hf.data import DataWarning, ItemVocabulary, PreparedData, check_trainable, prepare_data

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_data.py"



@pytest.fixture
def offline(monkeypatch):
    """No network in tests: a Hub lookup fails at once instead of after connection timeouts."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _lines(rows) -> str:
    return "".join(line + "\n" for line in rows)


def _parquet(path: Path, **columns) -> None:
    pq.write_table(pa.table(columns), path)


# Four users of 5 events each: a log that prepares fine (used to build the bad variants).
GOOD_CSV = ["user,item,timestamp"] + [f"u{u},i{(u + t) % 7},{t}" for u in range(4) for t in range(5)]


def _write_case(name: str, tmp_path: Path) -> list[str]:
    """Writes the bad input of case ``name``; returns the script's arguments (besides --output_dir)."""
    if name == "non_utf8_txt":
        (tmp_path / "log.txt").write_bytes("u1 a b c d\nu2 caf\u00e9 b c d\n".encode("latin-1"))
        return ["--dataset", str(tmp_path / "log.txt")]
    if name == "non_utf8_csv":
        (tmp_path / "log.csv").write_bytes(_lines(GOOD_CSV[:3] + ["u9,\u00e9t\u00e9,3"]).encode("latin-1"))
        return ["--dataset", str(tmp_path / "log.csv")]
    if name in ("duplicate_events_csv", "duplicate_lines_txt"):
        if name == "duplicate_events_csv":
            (tmp_path / "log.csv").write_text(_lines(GOOD_CSV[:4] + [GOOD_CSV[3]] + GOOD_CSV[4:]))
            return ["--dataset", str(tmp_path / "log.csv")]
        (tmp_path / "log.txt").write_text(_lines(["u1 a b c d", "u2 b c d e", "u3 c d e f", "u2 b c d e"]))
        return ["--dataset", str(tmp_path / "log.txt")]
    if name == "nan_item_parquet":
        _parquet(tmp_path / "log.parquet", user_id=["u1"] * 4, item_id=[1.0, 2.0, float("nan"), 4.0],
                 timestamp=[1, 2, 3, 4])
        return ["--dataset", str(tmp_path / "log.parquet")]
    if name == "null_user_parquet":
        _parquet(tmp_path / "log.parquet", user_id=["u1", "u1", None, "u1"], item_id=["a", "b", "c", "d"])
        return ["--dataset", str(tmp_path / "log.parquet")]
    if name == "nested_item_parquet":
        _parquet(tmp_path / "log.parquet", user_id=["u1"] * 4, item_id=[["a"], ["b"], ["c", "d"], ["e"]])
        return ["--dataset", str(tmp_path / "log.parquet")]
    if name == "nested_item_jsonl":
        rows = [{"user": "u1", "item": "a", "ts": 1}, {"user": "u1", "item": "b", "ts": 2},
                {"user": "u1", "item": {"id": "c"}, "ts": 3}]
        (tmp_path / "log.jsonl").write_text(_lines(json.dumps(row) for row in rows))
        return ["--dataset", str(tmp_path / "log.jsonl")]
    if name == "nan_timestamp_parquet":
        _parquet(tmp_path / "log.parquet", user="u1 u1 u1 u1".split(), item="a b c d".split(),
                 timestamp=[1.0, float("nan"), 3.0, 4.0])
        return ["--dataset", str(tmp_path / "log.parquet")]
    if name == "empty_item_csv":
        (tmp_path / "log.csv").write_text(_lines(GOOD_CSV[:3] + ["u1,,9"]))
        return ["--dataset", str(tmp_path / "log.csv")]
    if name == "all_users_too_short":
        (tmp_path / "log.txt").write_text(_lines(["u1 a", "u2 b", "u3 c b"]))
        return ["--dataset", str(tmp_path / "log.txt"), "--min_history_length", "1"]
    if name == "no_training_windows":
        (tmp_path / "log.txt").write_text(_lines(["u1 a b c", "u2 b c d"]))
        return ["--dataset", str(tmp_path / "log.txt")]
    if name == "unknown_dataset":
        return ["--dataset", "no_such_thing"]
    if name == "missing_file":
        return ["--dataset", str(tmp_path / "missing.csv")]
    if name in ("empty_txt", "empty_csv", "empty_jsonl"):
        path = tmp_path / f"log.{name.split('_')[1]}"
        path.write_text("")
        return ["--dataset", str(path)]
    if name == "empty_parquet":
        _parquet(tmp_path / "log.parquet", user_id=pa.array([], pa.string()), item_id=pa.array([], pa.string()))
        return ["--dataset", str(tmp_path / "log.parquet")]
    if name == "header_only_csv":
        (tmp_path / "log.csv").write_text("user,item\n")
        return ["--dataset", str(tmp_path / "log.csv")]
    if name == "not_parquet":
        (tmp_path / "log.parquet").write_text("user,item\nu1,a\n")
        return ["--dataset", str(tmp_path / "log.parquet")]
    if name in ("missing_columns", "named_column_absent"):
        (tmp_path / "log.csv").write_text(_lines(["who,what"] + [f"u{u},i{t}" for u in range(3) for t in range(4)]))
        extra = ["--user_column", "who", "--item_column", "item"] if name == "named_column_absent" else []
        return ["--dataset", str(tmp_path / "log.csv"), *extra]
    if name == "pairs_with_spaces_in_ids":
        (tmp_path / "log.txt").write_text(_lines(["u1 a", "u1 b", "u2 red shoe", "u2 c", "u1 d", "u2 e"]))
        return ["--dataset", str(tmp_path / "log.txt")]
    if name == "explicit_pairs_with_3_fields":
        (tmp_path / "log.txt").write_text(_lines(["u1 a", "u1 b", "u2 red shoe"]))
        return ["--dataset", str(tmp_path / "log.txt"), "--format", "sasrec_pairs"]
    if name == "bad_timestamp":
        (tmp_path / "log.csv").write_text(_lines(GOOD_CSV[:3] + ["u1,i2,soon"]))
        return ["--dataset", str(tmp_path / "log.csv")]
    if name == "wrong_field_count":
        (tmp_path / "log.csv").write_text(_lines(GOOD_CSV[:3] + ["u1,i2"]))
        return ["--dataset", str(tmp_path / "log.csv")]
    if name == "synthetic_option_with_a_file":
        (tmp_path / "log.csv").write_text(_lines(GOOD_CSV))
        return ["--dataset", str(tmp_path / "log.csv"), "--num_users", "3"]
    if name == "output_dir_not_a_prepared_folder":
        (tmp_path / "log.csv").write_text(_lines(GOOD_CSV))
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("mine")
        return ["--dataset", str(tmp_path / "log.csv")]
    raise AssertionError(name)


# case -> (exit status, first line of stderr as a regular expression; the whole stderr must be this one line)
CASES = {
    "non_utf8_txt": (2, r"error: dataset '.*log\.txt': .*log\.txt:2: not UTF-8 text \(byte 0xe9 at byte 7 of the "
                        r"line\); convert the file to UTF-8"),
    "non_utf8_csv": (2, r"error: dataset .*log\.csv:4: not UTF-8 text \(byte 0xe9"),
    "duplicate_events_csv": (0, r"warning: 1 event\(s\) repeat an earlier event exactly \(same user, item and "
                                r"timestamp; the first at row 3: user 'u0', item 'i2', time 2\); kept"),
    "duplicate_lines_txt": (0, r"warning: .*log\.txt: 1 line\(s\) repeat an earlier line exactly \(first at line "
                               r"4\); kept as repeated interactions"),
    "nan_item_parquet": (2, r"error: dataset .*log\.parquet: row 2: item id \(column 'item_id'\) is NaN \(missing\)"),
    "null_user_parquet": (2, r"error: dataset .*: row 2: user id \(column 'user_id'\) is missing \(null\)"),
    "nested_item_parquet": (2, r"error: dataset .*: row 0: item id \(column 'item_id'\) is a list, \['a'\], not a "
                               r"single id"),
    "nested_item_jsonl": (2, r"error: dataset .*log\.jsonl: row 2: item id \(column 'item'\) is a dict \(struct\), "
                             r"\{'id': 'c'\}, not a single id"),
    "nan_timestamp_parquet": (2, r"error: dataset .*: row 1: the timestamp \(column 'timestamp'\) is NaN"),
    "empty_item_csv": (2, r"error: dataset .*log\.csv:4: the item id \(column 'item'\) is empty"),
    "all_users_too_short": (2, r"error: dataset .*: no user has the 3 events that a validation and a test target "
                               r"need: the 3 users kept \(min_history_length=1\) have at most 2 events"),
    "no_training_windows": (2, r"error: dataset .*: no training windows \(every training history has fewer than 2 "
                               r"items\).* have at most 3 events"),
    "unknown_dataset": (2, r"error: dataset 'no_such_thing': 'no_such_thing' is not a local file or folder, nor a "
                           r"Hub dataset that can be loaded: "),
    "missing_file": (2, r"error: dataset .*missing\.csv: no such file"),
    "empty_txt": (2, r"error: dataset .*log\.txt: no interactions in the file"),
    "empty_csv": (2, r"error: dataset .*log\.csv: the file is empty"),
    "empty_jsonl": (2, r"error: dataset .*log\.jsonl: no interactions in the file \(it is empty\)"),
    "empty_parquet": (2, r"error: dataset .*log\.parquet: no interactions in the file \(the Parquet table has no "
                         r"rows\)"),
    "header_only_csv": (2, r"error: dataset .*log\.csv: no interactions in the file"),
    "not_parquet": (2, r"error: dataset .*log\.parquet: not a readable Parquet file"),
    "missing_columns": (2, r"error: dataset .*log\.csv has no user column \(looked for user, .*its columns are "
                           r"\['who', 'what'\]"),
    "named_column_absent": (2, r"error: dataset .*log\.csv has no column 'item' \(item_column\)"),
    "pairs_with_spaces_in_ids": (2, r"error: dataset .*log\.txt:3: 3 fields, but 2 user\(s\) \(e\.g\. 'u1'\) are "
                                    r"on several lines, as in a 'user item' pairs file: an item id with spaces\?"),
    "explicit_pairs_with_3_fields": (2, r"error: dataset .*log\.txt:3: expected 'user item' \(whitespace-separated; "
                                        r"ids cannot contain spaces\), got 3 field\(s\)"),
    "bad_timestamp": (2, r"error: dataset .*log\.csv:4: timestamp 'soon' is not a number or an ISO date"),
    "wrong_field_count": (2, r"error: dataset .*log\.csv:4: expected 3 fields"),
    "synthetic_option_with_a_file": (2, r"error: --num_users apply only to --dataset synthetic"),
    "output_dir_not_a_prepared_folder": (2, r"error: --output_dir: .*out exists and is not empty nor a prepared "
                                            r"dataset"),
}


@pytest.fixture
def own_warnings():
    """main() installs one-line warnings for the process; give the next test the warnings setup it had."""
    with warnings.catch_warnings():
        saved = warnings.showwarning
        yield
        warnings.showwarning = saved


def _run_main(prepare_data_script, argv) -> int:
    try:
        return prepare_data_script.main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_the_exit_status(prepare_data_script, case, tmp_path, capsys, offline, own_warnings):
    status, first_line = CASES[case]
    argv = _write_case(case, tmp_path) + ["--output_dir", str(tmp_path / "out")]
    existed = (tmp_path / "out").exists()
    assert _run_main(prepare_data_script, argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(first_line, err), err
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]  # no half-written folder left
    if status == 0:
        assert PreparedData.load(tmp_path / "out").info["users"] > 0
    elif not existed:
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["all_users_too_short", "unknown_dataset"])
def test_the_shell_sees_the_exit_status_and_one_line(case, tmp_path):
    argv = _write_case(case, tmp_path) + ["--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == CASES[case][0]
    assert re.match(CASES[case][1], run.stderr) and run.stderr.count("\n") == 1, run.stderr
    assert run.stdout == "" and not (tmp_path / "out").exists()


def test_check_trainable_is_what_prepare_data_refuses(tmp_path):
    """The script's check is the function training calls: same data, same error."""
    (tmp_path / "log.txt").write_text(_lines(["u1 a", "u2 b c"]))
    data = prepare_data(str(tmp_path / "log.txt"), min_history_length=1)
    with pytest.raises(ValueError, match="no user has the 3 events"):
        check_trainable(data, 50)
    good = prepare_data("synthetic", num_users=20, num_items=10)
    assert len(check_trainable(good, 50)) > 0


def test_saving_replaces_a_prepared_folder_atomically(prepare_data_script, tmp_path, monkeypatch, capsys, own_warnings):
    (tmp_path / "log.csv").write_text(_lines(GOOD_CSV))
    out = tmp_path / "out"
    assert prepare_data_script.main(["--dataset", str(tmp_path / "log.csv"), "--output_dir", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(self, directory):  # Ctrl-C while the new folder is half-written
        (Path(directory) / "train.parquet").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ItemVocabulary, "save_pretrained", interrupted)
    assert prepare_data_script.main(["--dataset", str(tmp_path / "log.csv"), "--output_dir", str(out)]) == 130
    assert capsys.readouterr().err == f"interrupted: {out} was not written\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "out"]  # no staging folder left

    monkeypatch.undo()
    (tmp_path / "log.csv").write_text(_lines(GOOD_CSV + ["u9,i1,1", "u9,i2,2", "u9,i3,3"]))
    assert prepare_data_script.main(["--dataset", str(tmp_path / "log.csv"), "--output_dir", str(out)]) == 0
    assert PreparedData.load(out).info["users"] == 5  # replaced by the new preparation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "out"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_ids_with_spaces_are_only_an_error_where_the_layout_is_ambiguous(tmp_path):
    from blossomrec_hf.data import load_interactions

    pairs = tmp_path / "pairs.txt"
    pairs.write_text(_lines(["u1 a", "u1 b", "u2 red shoe", "u2 c"]))
    with pytest.raises(ValueError, match=r"pairs\.txt:3: 3 fields, but 2 user\(s\)"):
        load_interactions(str(pairs))
    # Asked for explicitly, the same file is sequences: tokens split on whitespace, as documented.
    assert load_interactions(str(pairs), format="sequences")["item"] == ["a", "b", "red", "shoe", "c"]
    # One line per user (S3Rec), lengths varying: not ambiguous; a line repeated exactly is a warning, not this error.
    sequences = tmp_path / "sequences.txt"
    sequences.write_text(_lines(["u1 a b c", "u2 b", "u3 a b c d", "u1 a b c"]))
    with pytest.warns(DataWarning, match=r"1 line\(s\) repeat an earlier line exactly \(first at line 4\)"):
        assert len(load_interactions(str(sequences))) == 11


def test_in_memory_columns_name_the_bad_row():
    from blossomrec_hf.data import load_interactions

    with pytest.raises(ValueError, match=r"row 1: item id \(column 'item_id'\) is NaN"):
        load_interactions({"user_id": ["u", "u"], "item_id": [1.0, float("nan")]})
    with pytest.raises(ValueError, match=r"row 0: user id \(column 'user'\) is empty"):
        load_interactions({"user": ["", "u"], "item": ["a", "b"]})
    events = load_interactions({"user": ["u", "u"], "item": [7, 8], "rating": [None, 4.0]})
    assert events["item"] == ["7", "8"] and events["rating"][1] == 4.0
