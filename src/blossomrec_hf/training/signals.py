"""SIGINT/SIGTERM as a request to checkpoint and stop at the next step boundary, agreed on by all processes."""

from __future__ import annotations

import os
import signal

import torch

ANNOUNCEMENT = ("\nstopping: a checkpoint is saved at the next step boundary, then the run exits (resume with "
                "--resume_from_checkpoint latest); the same signal again stops at once, without one\n")


class StopSignals:
    """SIGINT/SIGTERM only set a flag; training checkpoints at the next step boundary and exits.

    The first signal is the one that counts (its number makes the exit status); the other kind may follow without
    effect, as ``accelerate launch`` sends SIGTERM right after a Ctrl-C. A second signal of the same kind gets the
    default behaviour (an immediate stop, without a checkpoint). With several processes the flag is shared, so all
    of them stop at the same step even if only one was signalled; that takes a collective (and a device sync), so it
    happens only every ``sync_every`` steps. ``announce``: say on stdout, once, that the run is stopping.
    """

    def __init__(self, sync_every: int = 10, announce: bool = True):
        self.received: int | None = None
        self.sync_every = sync_every
        self.announce = announce
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            if self.announce:
                # stdout, which launchers pass through as it is (accelerate launch relays stderr, and can drop what
                # arrives as it handles Ctrl-C); os.write, not print: the handler may interrupt a print.
                os.write(1, ANNOUNCEMENT.encode())
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
