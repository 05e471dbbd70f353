"""SIGINT/SIGTERM as a request to checkpoint and stop at the next step boundary, agreed on by all processes."""

from __future__ import annotations

import signal

import torch


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
