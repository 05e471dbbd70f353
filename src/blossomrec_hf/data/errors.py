"""How the data layer reports bad input: exceptions with one-line messages, ``DataWarning``, and the CLI wrappers that
turn them into one ``error: ...`` / ``warning: ...`` line on stderr.

Bad input raises ``ValueError`` (bad content: the message names the file and line, or the column and row),
``KeyError`` (a missing column), ``FileNotFoundError`` / ``OSError`` (no such file, dataset or Hub connection) or
``MissingDependencyError`` (a reader needs a library that is not installed). ``user_input_errors`` is the one place
that turns them into exit status 2 (as argparse does for bad flags), so every script reports them alike.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

EXIT_BAD_INPUT = 2  # argparse's status for a bad command line; also bad data
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class MissingDependencyError(ImportError):
    """A reader needs a library that is not installed (the message says which and how to install it)."""


class DataWarning(UserWarning):
    """Something in the data that is probably a mistake but is kept (e.g. events repeated exactly)."""


USER_INPUT_ERRORS = (ValueError, KeyError, TypeError, OSError, MissingDependencyError)


def error_message(error: BaseException) -> str:
    """The message of an input error on one line (a ``KeyError`` without its quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split("\n"))


@contextlib.contextmanager
def user_input_errors(what: str):
    """Turn errors caused by the user's input (bad data, bad flags) into one ``error: {what}: ...`` line on stderr
    and exit status 2; anything else (a bug) keeps its traceback."""
    try:
        yield
    except USER_INPUT_ERRORS as error:
        print(f"error: {what}: {error_message(error)}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def one_line_data_warnings() -> None:
    """Show every ``DataWarning`` as one ``warning: ...`` line on stderr, each time it happens (other warnings are
    shown as before). For command-line scripts: it replaces ``warnings.showwarning`` for the whole process."""
    shown_before = warnings.showwarning
    if getattr(shown_before, "_one_line_data_warnings", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        else:
            shown_before(message, category, filename, lineno, file, line)

    show._one_line_data_warnings = True
    warnings.showwarning = show
    warnings.simplefilter("always", DataWarning)
