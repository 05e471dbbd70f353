"""The logged training loss and items/s: summed on the device between log lines, checked for non-finite values."""

from __future__ import annotations

import math

import torch

from ..checkpointing import TrainerState


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the weights are lost and must not be checkpointed."""


class LoggingWindow:
    """What each process trained on since the last fold: summed batch losses, batches and next-item targets.

    The sums stay on the device (no sync per step). ``fold`` adds them, over all processes, into the trainer state;
    the trainer folds before every log line, evaluation and checkpoint, so a checkpoint carries the open window and
    a non-finite loss is caught before the weights it produced are evaluated or saved.
    """

    def __init__(self, device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, num_targets: int) -> None:
        self.sums += torch.stack([loss.detach().double(), torch.ones_like(self.sums[0]),
                                  torch.full_like(self.sums[0], num_targets)])

    def fold(self, accelerator, state: TrainerState) -> None:
        """Move the sums of all processes into ``state`` (a collective: every process calls it at the same step)."""
        loss_sum, batches, targets = accelerator.reduce(self.sums, reduction="sum").tolist()
        self.sums.zero_()
        if not math.isfinite(loss_sum):
            raise NonFiniteLoss(f"the training loss is {loss_sum} by step {state.global_step}")
        state.window_loss_sum += loss_sum
        state.window_batches += int(batches)
        state.window_targets += int(targets)
        state.train_targets += int(targets)

    @staticmethod
    def close(state: TrainerState, learning_rate: float) -> dict:
        """The log line of the folded window (loss, learning rate, items/s); opens the next window."""
        seconds = state.train_seconds - state.window_start_seconds
        logs = {"train/loss": round(state.window_loss_sum / max(state.window_batches, 1), 6),
                "train/learning_rate": learning_rate,
                "train/items_per_second": round(state.window_targets / max(seconds, 1e-9), 1)}
        state.window_loss_sum, state.window_batches, state.window_targets = 0.0, 0, 0
        state.window_start_seconds = state.train_seconds
        return logs
