"""How the data layer reports bad input: exceptions with one-line messages, ``DataWarning``, and the CLI wrapper that
turns a ``DataWarning`` into one ``warning: ...`` line on stderr.

Bad input raises ``ValueError`` (bad content: the message names the file and line, or the column and row),
``KeyError`` (a missing column), ``FileNotFoundError`` / ``OSError`` (no such file, dataset or Hub connection) or
``MissingDependencyError`` (a reader needs a library that is not installed). ``user_input_errors`` turns them into
one ``error: ...`` line and exit status 2; it lives in ``blossomrec_hf.errors`` (shared with the training flags) and
is importable from here too.
"""

from __future__ import annotations

import sys
import warnings

from ..errors import (EXIT_BAD_INPUT, EXIT_INTERRUPTED, USER_INPUT_ERRORS, MissingDependencyError, error_message,
                      user_input_errors)

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "USER_INPUT_ERRORS", "DataWarning", "MissingDependencyError",
           "error_message", "one_line_data_warnings", "user_input_errors"]


class DataWarning(UserWarning):
    """Something in the data that is probably a mistake but is kept (e.g. events repeated exactly)."""


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
