"""Resumable training: the trainer's own state, checkpoints under ``output_dir/checkpoints``, and stop signals.

A checkpoint is ``accelerator.save_state`` (model, optimizer, scheduler, gradient-accumulation step, every RNG)
plus ``trainer_state.json`` (position in the data, best validation result, patience, timings, logged losses). The
JSON is written last, so a directory without it is an incomplete checkpoint and is never resumed from.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0  # epoch of the next batch
    batches_in_epoch: int = 0  # batches of that epoch already trained on (per process)
    train_seconds: float = 0.0  # time spent in training steps, without evaluation and checkpointing
    train_targets: int = 0  # next-item predictions trained on, all processes together (for items/s)
    best_metric: float | None = None
    best_step: int | None = None
    best_epoch: float | None = None
    best_train_seconds: float | None = None
    best_validation: dict | None = None
    evaluations_without_improvement: int = 0
    stopped_early: bool = False
    log_history: list[dict] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        return cls(**json.loads(path.read_text()))


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest first."""
    root = output_dir / CHECKPOINTS_DIR
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_checkpoint(output_dir: Path, requested: str) -> Path:
    """The directory meant by ``--resume_from_checkpoint`` (a path, or ``latest`` in ``output_dir``)."""
    if requested == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in "
                                    f"{output_dir / CHECKPOINTS_DIR}")
        return found[-1]
    path = Path(requested)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {requested}: not a complete checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator, output_dir: Path, state: TrainerState, total_limit: int) -> Path:
    """Write a checkpoint for ``state.global_step`` (all processes call this) and drop the oldest beyond the limit."""
    path = output_dir / CHECKPOINTS_DIR / f"step-{state.global_step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        state.save(path / STATE_FILE)
        for old in checkpoint_dirs(output_dir)[:-max(total_limit, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    return TrainerState.load(path / STATE_FILE)


class StopSignals:
    """SIGINT/SIGTERM only set a flag; training checkpoints at the next step boundary and exits.

    A second signal of the same kind gets the default behaviour (an immediate stop). With several processes the
    flag is shared, so all of them stop at the same step even if only one was signalled; that takes a collective
    (and a device sync), so it happens only every ``sync_every`` steps.
    """

    def __init__(self, sync_every: int = 10):
        self.received: int | None = None
        self.sync_every = sync_every
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

    def requested(self, accelerator, step: int) -> bool:
        """Whether to stop after ``step``; every process must call this at every step."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if step % self.sync_every:
            return False
        flag = torch.tensor([0 if self.received is None else self.received], device=accelerator.device)
        flag = accelerator.reduce(flag, reduction="max")
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return bool(flag.item())

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received or signal.SIGTERM)
