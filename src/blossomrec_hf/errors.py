"""How the scripts report bad input: one ``error: ...`` line on stderr and exit status 2, in one process or several.

Bad input raises ``ValueError`` (bad content or flags: the message names the file and line, the column and row, or
the flag), ``KeyError`` (a missing column), ``TypeError``, ``FileNotFoundError`` / ``OSError`` (no such file,
dataset or Hub connection; an output folder that cannot be written) or ``MissingDependencyError`` (a library that is
not installed). ``user_input_errors`` turns them into exit status 2 (as argparse does for bad flags), so every script
reports them alike; anything else is a bug and keeps its traceback. ``InputErrors`` does the same for code that all
processes of a distributed run go through together.
"""

from __future__ import annotations

import contextlib
import sys

EXIT_BAD_INPUT = 2  # argparse's status for a bad command line; also bad data
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class MissingDependencyError(ImportError):
    """A reader needs a library that is not installed (the message says which and how to install it)."""


USER_INPUT_ERRORS = (ValueError, KeyError, TypeError, OSError, MissingDependencyError)


def error_message(error: BaseException) -> str:
    """The message of an input error on one line (a ``KeyError`` without its quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split("\n"))


@contextlib.contextmanager
def user_input_errors(what: str, accelerator=None):
    """Turn errors caused by the user's input (bad data, bad flags) into one ``error: {what}: ...`` line on stderr
    and exit status 2; anything else (a bug) keeps its traceback.

    With an ``accelerator`` of several processes, every process must run the block: if it fails on any of them,
    all of them exit, and the main process prints the error once (see ``InputErrors``).
    """
    errors = InputErrors(what)
    with errors:
        yield
    errors.exit_if_any(accelerator)


def messages_of_all_processes(accelerator, message: str | None) -> list[str]:
    """Every process's ``message`` that is not None, in rank order (the main process's first). A collective with
    several processes: every process calls it at the same point. Without an accelerator: this process's only."""
    messages = [message]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        messages = gather_object(messages)
    return [message for message in messages if message is not None]


class InputErrors:
    """``user_input_errors`` for a distributed run: every process stops, and the error is printed once.

        errors = InputErrors(f"dataset {name!r}")
        with accelerator.main_process_first(), errors:
            data = prepare_data(name)        # an input error is kept; the block is left normally, so no process
                                             # is left waiting at main_process_first's barrier
        errors.exit_if_any(accelerator)      # all processes: SystemExit(2) if any of them failed

    ``exit_if_any`` is a collective: every process must call it, at the same point.
    """

    def __init__(self, what: str):
        self.what = what
        self.message: str | None = None

    def __enter__(self) -> "InputErrors":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, USER_INPUT_ERRORS):
            self.message = f"error: {self.what}: {error_message(error)}"
            return True
        return False

    def exit_if_any(self, accelerator=None) -> None:
        """Raise ``SystemExit(2)`` on every process if any process met an input error; the main process prints the
        first one (its own if it has one). Without an accelerator: this process only."""
        failed = messages_of_all_processes(accelerator, self.message)
        if not failed:
            return
        if accelerator is None or accelerator.is_main_process:
            print(failed[0], file=sys.stderr)
        if accelerator is not None and accelerator.num_processes > 1:
            _leave_process_group()
        raise SystemExit(EXIT_BAD_INPUT)


def _leave_process_group() -> None:
    """Tear the process group down together before exiting: a process that exits with it alive can be aborted
    (SIGABRT) while its peer is still connected, and its exit status 2 is lost."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
