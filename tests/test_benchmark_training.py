"""scripts/benchmark_training.py on the CPU: a tiny long-tail configuration, every row measured and written."""

import json

import numpy as np
import pytest

from conftest import script_module

TINY_MODEL = ["--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads", "2",
              "--num_key_value_heads", "1", "--intermediate_size", "32"]


@pytest.fixture(scope="module")
def training_benchmark():
    yield from script_module("scripts/benchmark_training.py", "benchmark_training")


def test_every_row_is_measured_and_written(training_benchmark, tmp_path):
    prefix = tmp_path / "results" / "training_benchmark"
    result = training_benchmark.main([
        "--datasets", "longtail64", "--device", "cpu", "--data_dir", str(tmp_path / "no_data"),
        "--blossom_implementation", "blossom_torch", *TINY_MODEL,
        "--longtail_users", "30", "--longtail_items", "100",
        "--max_tokens_per_batch", "256", "--per_device_train_batch_size", "8",
        "--warmup_steps", "1", "--max_steps", "2", "--output", str(prefix)])

    written = json.loads(prefix.with_suffix(".json").read_text())
    assert written["rows"] == json.loads(json.dumps(result["rows"]))
    assert {(r["model"], r["layout"]) for r in written["rows"]} == {
        (model, layout) for model in ("blossom", "dense") for layout in ("padded", "packed")}
    for row in written["rows"]:
        assert row["status"] == "ok", row
        assert row["dataset"] == "longtail64" and row["max_seq_length"] == 64
        for key in ("items_per_s", "epoch_s", "mean_step_ms", "median_step_ms", "timed_seconds"):
            assert row[key] > 0, (key, row)
        assert 1 <= row["timed_steps"] <= 2
        assert row["epoch_extrapolated"] == (row["timed_steps"] < row["batches_per_epoch"])
        assert row["peak_memory_gib"] is None and row["peak_reserved_gib"] is None  # no GPU
    packed = [r for r in written["rows"] if r["layout"] == "packed"]
    assert all(r["max_tokens_per_batch"] == 256 for r in packed)
    assert {r["attn_implementation"] for r in written["rows"]} == {"blossom_torch", "sdpa"}

    assert len(written["ratios"]["packed_over_padded_epoch_speedup"]) == 2
    assert all(r["ratio"] > 0 for r in written["ratios"]["packed_over_padded_epoch_speedup"])
    assert all(r["items_per_s_ratio"] > 0 for r in written["ratios"]["blossom_over_dense"])
    # no Beauty, L=200 or L=16384 rows here: every target is listed as not measured
    assert written["targets"] and all(t["status"] == "not measured" for t in written["targets"])
    assert written["command"].startswith("python scripts/benchmark_training.py --datasets longtail64")
    assert written["settings"]["model_config"]["hidden_size"] == 16
    text = prefix.with_suffix(".txt").read_text()
    assert "items/s" in text and "targets:" in text and text.count("longtail64") >= 4
    assert prefix.with_suffix(".png").stat().st_size > 0


def test_long_tail_lengths_span_one_to_the_max_length(training_benchmark):
    events = training_benchmark.long_tail_interactions(num_users=2000, max_length=256, num_items=50, seed=0)
    _, counts = np.unique(np.asarray(events["user"], dtype=str), return_counts=True)
    trained = counts - 2  # validation and test targets
    assert trained.min() >= 1 and trained.max() <= 256
    # log-uniform: about as many users below 16 as from 16 up to 256
    assert 0.45 < np.mean(trained < 16) < 0.55


def test_unknown_dataset_and_missing_files_are_one_line_errors(training_benchmark, tmp_path, capsys):
    with pytest.raises(SystemExit):
        training_benchmark.main(["--datasets", "imdb", "--device", "cpu"])
    assert "unknown dataset 'imdb'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        training_benchmark.main(["--datasets", "beauty50", "--device", "cpu", "--data_dir", str(tmp_path)])
    assert "Beauty.txt (pass --data_dir)" in capsys.readouterr().err


def test_rows_take_train_py_batch_defaults_and_compile_flags(training_benchmark):
    args, specs, _ = training_benchmark.parse_arguments(
        ["--datasets", "longtail16k", "longtail50", "--device", "cpu", "--torch_compile",
         "--torch_compile_mode", "reduce-overhead"])
    long, short = specs
    packed = training_benchmark.training_arguments(long, model="blossom", layout="packed", args=args)
    assert packed.torch_compile and packed.torch_compile_mode == "reduce-overhead"
    # train.py's default budget: the padded batch's capacity (131,072 items' worth of windows at 16k)
    assert packed.tokens_per_batch == 7 * 16385 and packed.per_device_train_batch_size == 7
    padded = training_benchmark.training_arguments(short, model="dense", layout="padded", args=args)
    assert padded.tokens_per_batch == 0 and padded.per_device_train_batch_size == 131072 // 51
    # unset, the rows take train.py's default (decided by the Trainer); false means eager, and a mode with it is refused
    for flags, expected in (([], None), (["--torch_compile", "false"], False), (["--torch_compile"], True)):
        args = training_benchmark.parse_arguments(["--datasets", "longtail50", "--device", "cpu", *flags])[0]
        assert training_benchmark.training_arguments(long, model="blossom", layout="packed",
                                                     args=args).torch_compile is expected
    with pytest.raises(SystemExit):
        training_benchmark.parse_arguments(["--device", "cpu", "--torch_compile", "false", "--torch_compile_mode",
                                            "reduce-overhead"])


def test_short_epochs_are_timed_over_several_whole_epochs(training_benchmark, tmp_path):
    """A packed epoch of a step or two is timed over as many whole epochs as --min_timed_steps asks for, and its time
    is their mean, not an extrapolation."""
    result = training_benchmark.main([
        "--datasets", "longtail64", "--models", "dense", "--layouts", "packed", "--device", "cpu",
        "--data_dir", str(tmp_path / "no_data"), *TINY_MODEL, "--longtail_users", "30", "--longtail_items", "100",
        "--max_tokens_per_batch", "4096", "--warmup_steps", "1", "--min_timed_steps", "5", "--no_plot",
        "--output", str(tmp_path / "short")])
    (row,) = result["rows"]
    assert row["status"] == "ok", row
    per_epoch = row["batches_per_epoch"]
    assert per_epoch < 5
    assert row["timed_epochs"] == -(-5 // per_epoch) and row["timed_steps"] == row["timed_epochs"] * per_epoch
    assert not row["epoch_extrapolated"]
    assert row["epoch_s"] == pytest.approx(row["timed_seconds"] / row["timed_epochs"])


def test_profiled_steps_list_the_busiest_kernels(training_benchmark, tmp_path):
    result = training_benchmark.main([
        "--datasets", "longtail64", "--models", "blossom", "--layouts", "packed", "--device", "cpu",
        "--blossom_implementation", "blossom_torch", "--data_dir", str(tmp_path / "no_data"), *TINY_MODEL,
        "--longtail_users", "30", "--longtail_items", "100", "--max_tokens_per_batch", "256", "--warmup_steps", "1",
        "--max_steps", "2", "--profile_steps", "2", "--no_plot", "--output", str(tmp_path / "profiled")])
    (row,) = result["rows"]
    profile = row["profile"]
    assert row["status"] == "ok" and profile["steps"] == 2
    assert 0 < profile["device_ms_per_step"] and 0 < profile["wall_ms_per_step"]
    times = [kernel["ms_per_step"] for kernel in profile["kernels"]]
    assert len(times) == 12 and times == sorted(times, reverse=True) and sum(times) <= profile["device_ms_per_step"]
    assert any("mm" in kernel["name"] for kernel in profile["kernels"])  # the projections and the loss
    assert "longtail64 blossom packed:" in (tmp_path / "profiled.txt").read_text()
    host = profile["host_ms_per_step"]  # where the host's time goes, phase by phase
    assert list(host) == ["batch", "forward", "backward", "rest"] and all(ms > 0 for ms in host.values())
    assert "host ms per step: batch" in (tmp_path / "profiled.txt").read_text()
