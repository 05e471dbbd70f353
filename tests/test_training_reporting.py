"""What a run reports besides metrics: TensorBoard only where it is installed, and the training-curves plot."""

import sys

import pytest

from blossomrec_hf import training_args
from blossomrec_hf.training.plot import plot_training_curves

HISTORY = [
    {"step": 1, "train/loss": 3.7, "train/learning_rate": 1e-3, "train/items_per_second": 100.0},
    {"step": 2, "train/loss": 3.5, "train/learning_rate": 1e-3, "train/items_per_second": 100.0},
    {"step": 2, "epoch": 0.5, "validation/ndcg@10": 0.10, "validation/recall@10": 0.20},
    {"step": 4, "train/loss": 3.1, "train/learning_rate": 1e-3, "train/items_per_second": 100.0},
    {"step": 4, "epoch": 1.0, "validation/ndcg@10": 0.15, "validation/recall@10": 0.30},
]


def test_tensorboard_reporting_without_tensorboard_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(training_args, "is_tensorboard_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        training_args.parse_training_arguments(["--report_to", "tensorboard"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ('error: arguments: --report_to tensorboard needs TensorBoard, which is not '
                                       'installed: pip install -e ".[tensorboard]"\n')
    monkeypatch.setattr(training_args, "is_tensorboard_available", lambda: True)
    assert training_args.parse_training_arguments(["--report_to", "tensorboard"])[2].report_to == "tensorboard"


def test_training_curves_are_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_training_curves(HISTORY, tmp_path / "training_curves.png")
    assert path == tmp_path / "training_curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["training_curves.png"]


def test_without_matplotlib_no_plot_is_drawn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plot_training_curves(HISTORY, tmp_path / "training_curves.png") is None
    assert list(tmp_path.iterdir()) == []
