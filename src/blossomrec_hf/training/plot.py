"""A picture of a finished run: training loss and validation metrics over optimizer steps (matplotlib optional)."""

from __future__ import annotations

from pathlib import Path

from ..checkpointing import write_atomic

PLOT_FILE = "training_curves.png"
VALIDATION_METRICS = ("ndcg@10", "recall@10")


def plot_training_curves(log_history: list[dict], path: Path) -> Path | None:
    """Draw ``log_history`` into the PNG ``path``; None when matplotlib (the ``plot`` extra) is not installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    except ImportError:
        return None
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, metric_axes = figure.subplots(1, 2)
    losses = [entry for entry in log_history if "train/loss" in entry]
    loss_axes.plot([e["step"] for e in losses], [e["train/loss"] for e in losses])
    loss_axes.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    evaluations = [entry for entry in log_history if any(f"validation/{m}" in entry for m in VALIDATION_METRICS)]
    for metric in VALIDATION_METRICS:
        metric_axes.plot([e["step"] for e in evaluations], [e.get(f"validation/{metric}") for e in evaluations],
                         marker="o", label=metric)
    metric_axes.set(title="validation", xlabel="step")
    metric_axes.legend()
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=100))
    return Path(path)
