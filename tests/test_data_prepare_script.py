"""scripts/prepare_data.py: writes splits and vocabulary that prepare_data loads back unchanged."""

from blossomrec_hf.data import ItemVocabulary, prepare_data



def test_prepares_a_file_and_the_output_loads_back(prepare_data_script, tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("who,what,when\n" + "".join(f"u{u},i{(u * 7 + t) % 9},{t}\n" for u in range(6) for t in range(5)))
    out = tmp_path / "prepared"
    assert prepare_data_script.main(["--dataset", str(log), "--output_dir", str(out), "--user_column", "who",
                        "--item_column", "what", "--timestamp_column", "when", "--k_core", "2"]) == 0
    assert '"users": 6' in capsys.readouterr().out
    fresh = prepare_data(str(log), k_core=2, user_column="who", item_column="what", timestamp_column="when")
    loaded = prepare_data(str(out), k_core=2)
    assert loaded.vocab == fresh.vocab == ItemVocabulary.from_pretrained(out)
    for split in ("train", "validation", "test"):
        assert loaded.splits[split][:] == fresh.splits[split][:]


def test_synthetic_options(prepare_data_script, tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert prepare_data_script.main(["--output_dir", str(out), "--num_users", "30", "--num_items", "20", "--seed", "3"]) == 0
    data = prepare_data(str(out))
    assert data.info["users"] == 30 and data.vocab.n_items == 20 and data.info["reader_kwargs"]["seed"] == 3


def test_bad_input_is_one_clear_line(prepare_data_script, tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("a,b\n1,2\n")
    assert prepare_data_script.main(["--dataset", str(log), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: dataset {str(log)!r}: ") and "no user column" in err and "Traceback" not in err
    assert prepare_data_script.main(["--dataset", str(log), "--output_dir", str(tmp_path / "o"), "--num_users", "3"]) == 2
    assert not (tmp_path / "out").exists()
