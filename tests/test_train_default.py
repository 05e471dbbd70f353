"""The no-argument training run (shrunk by flags), what it saves, loading that with AutoModel, and bad input."""

import importlib.util
import os
import subprocess
import sys

import pytest

from train_helpers import (EVALUATE, TRAIN, accelerate_command, check, python_command, read_json, run_script,
                           script_env, write_sequences_file)

# The default run, made CI-sized: a smaller model and one epoch (the data stays the built-in synthetic default).
SHRINK = ["--num_train_epochs", "1", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
          "--num_key_value_heads", "1", "--intermediate_size", "64"]

LOAD_WITH_AUTOMODEL = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(model).__name__ == "BlossomRecForSequentialRecommendation", type(model)
assert "blossomrec_hf" not in sys.modules, "remote code must not need the package"
scores = model(torch.tensor([[0, 3, 5, 7]]), logits_to_keep=1).logits
print(model.config.n_items, tuple(scores.shape))
"""


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``accelerate launch scripts/train.py`` with no data or output arguments, run from an empty directory."""
    workdir = tmp_path_factory.mktemp("default")
    result = run_script(accelerate_command(TRAIN, *SHRINK), timeout=150, cwd=workdir)
    return check(result), workdir / "outputs" / "blossomrec-synthetic"


def test_default_run_saves_model_vocabulary_and_metrics(default_run):
    result, output_dir = default_run
    for name in ("config.json", "model.safetensors", "modeling_blossomrec.py", "configuration_blossomrec.py",
                 "item_vocabulary.json", "training_args.json", "metrics.json"):
        assert (output_dir / name).is_file(), name
    assert not list(output_dir.glob("*.bin"))
    metrics = read_json(output_dir / "metrics.json")
    assert metrics["dataset"] == "synthetic" and metrics["attention_type"] == "blossom"
    assert metrics["test"]["model"]["num_users"] == metrics["test"]["popularity"]["num_users"] == 2000
    assert metrics["train_seconds_to_best"] > 0 and metrics["best_step"] == metrics["global_step"]
    assert metrics["peak_gpu_memory_mib"] is None  # no GPU here: the allocator peak is recorded on CUDA only
    # Even a tiny model after one epoch is far ahead of popularity on the planted structure.
    assert metrics["test"]["model"]["ndcg@10"] > 3 * metrics["test"]["popularity"]["ndcg@10"]
    assert "popularity" in result.stdout and "ndcg@10" in result.stdout  # the printed test table
    assert read_json(output_dir / "training_args.json")["output_dir"] == "outputs/blossomrec-synthetic"


def test_default_run_plots_its_curves_where_matplotlib_is_installed(default_run):
    result, output_dir = default_run
    drawn = importlib.util.find_spec("matplotlib") is not None  # the script runs on this interpreter
    assert (output_dir / "training_curves.png").is_file() == drawn
    if drawn:
        assert "training curves: outputs/blossomrec-synthetic/training_curves.png" in result.stdout
    else:
        assert 'training curves not drawn: matplotlib is not installed (pip install -e ".[plot]")' in result.stdout


def test_saved_model_loads_with_automodel_remote_code(default_run, tmp_path):
    _, output_dir = default_run
    env = {key: value for key, value in script_env(HF_HOME=str(tmp_path / "hf")).items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", LOAD_WITH_AUTOMODEL, str(output_dir)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert check(result).stdout.split() == ["500", "(1,", "1,", "501)"]


def test_evaluate_refuses_data_with_another_vocabulary(default_run, tmp_path):
    _, output_dir = default_run
    log = write_sequences_file(tmp_path / "other.txt")
    result = run_script(python_command(EVALUATE, "--model", str(output_dir), "--dataset", str(log)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: dataset")
    assert "vocabulary" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("content, flags, message", [
    ("user_id,thing,ts\n1,2,3\n", [], "no item column"),
    ("u1 i1 i2 i3\nu2 i2 i3 i4\n", ["--min_history_length", "50"], "at least 50"),
    ("u1 i1 i2 i3 i4 i5\n", ["--hidden_size", "30"], "divisible"),
])
def test_bad_input_is_one_error_line(tmp_path, content, flags, message):
    data = tmp_path / ("log.csv" if "," in content else "log.txt")
    data.write_text(content)
    result = run_script(python_command(TRAIN, "--dataset", str(data), "--output_dir", str(tmp_path / "out"), *flags))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_existing_checkpoints_need_resume_or_overwrite(default_run):
    _, output_dir = default_run
    result = run_script(python_command(TRAIN, "--output_dir", str(output_dir), *SHRINK))
    assert result.returncode == 2 and "--resume_from_checkpoint latest" in result.stderr
    assert os.path.isdir(output_dir / "checkpoints")
