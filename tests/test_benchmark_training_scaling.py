"""scripts/benchmark_training.py --multi_gpu on the CPU: the script launches itself on 1 and 2 gloo processes (tiny
long-tail log) and writes the rows of both, the scaling efficiency, the targets, the text and the plot."""

import json

import pytest

from conftest import script_module

TINY_MODEL = ["--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads", "2",
              "--num_key_value_heads", "1", "--intermediate_size", "32"]


@pytest.fixture(scope="module")
def benchmark_script():
    yield from script_module("scripts/benchmark_training.py", "benchmark_training_scaling")


def test_scaling_over_one_and_two_processes_is_measured_and_written(benchmark_script, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per process on a shared CPU
    prefix = tmp_path / "results" / "training_scaling"
    result = benchmark_script.main([
        "--datasets", "longtail64", "--device", "cpu", "--data_dir", str(tmp_path / "no_data"),
        "--models", "blossom", "--layouts", "packed", "--blossom_implementation", "blossom_torch", *TINY_MODEL,
        "--longtail_users", "40", "--longtail_items", "100", "--max_tokens_per_batch", "256",
        "--warmup_steps", "1", "--max_steps", "3", "--multi_gpu", "2", "1", "--output", str(prefix)])

    written = json.loads(prefix.with_suffix(".json").read_text())
    assert written["scaling"] == json.loads(json.dumps(result["scaling"]))
    assert [(run["num_processes"], run["returncode"]) for run in written["runs"]] == [(1, 0), (2, 0)]
    assert "--num_processes 2" in written["runs"][1]["command"] and "--multi_gpu" in written["runs"][1]["command"]
    rows = {row["num_processes"]: row for row in written["rows"]}
    assert sorted(rows) == [1, 2] and all(row["status"] == "ok" for row in rows.values())
    for row in rows.values():
        assert row["items_per_s"] > 0 and row["timed_targets"] > 0 and 1 <= row["timed_steps"] <= 3
    # two processes: a batch of 256 items each per step, so fewer steps per epoch and more targets per step
    assert rows[2]["batches_per_epoch"] == -(-rows[1]["batches_per_epoch"] // 2)
    scaling = {entry["num_processes"]: entry for entry in written["scaling"]}
    assert scaling[1]["scaling_efficiency"] == pytest.approx(1.0)
    assert scaling[2]["items_per_s_per_process"] == pytest.approx(rows[2]["items_per_s"] / 2)
    assert scaling[2]["scaling_efficiency"] == pytest.approx(rows[2]["items_per_s"] / 2 / rows[1]["items_per_s"])
    targets = {t["target"]: t for t in written["targets"]}
    measured = targets["scaling efficiency on 2 processes (longtail64, blossom, packed)"]
    assert measured["measured"] == pytest.approx(scaling[2]["scaling_efficiency"])
    assert measured["status"] in ("met", "missed")
    assert targets["scaling efficiency on 8 processes"]["status"] == "not measured"
    text = prefix.with_suffix(".txt").read_text()
    assert "scaling over processes" in text and "efficiency" in text
    assert prefix.with_suffix(".png").stat().st_size > 0


def test_the_launched_runs_get_the_arguments_but_the_scaling_options(benchmark_script):
    argv = ["--datasets", "a", "b", "--multi_gpu", "1", "2", "--output", "x", "--no_plot", "--max_steps=3"]
    assert benchmark_script.without_option(benchmark_script.without_option(argv, "--multi_gpu"), "--output") == \
        ["--datasets", "a", "b", "--no_plot", "--max_steps=3"]
    assert benchmark_script.without_option(["--multi_gpu=2", "--seed", "1"], "--multi_gpu") == ["--seed", "1"]
