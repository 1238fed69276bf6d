"""User errors: one line on stderr and exit status 2, never a traceback.

Anything the user can fix (a flag, a file, a device that is absent) raises :class:`UserError`
as early as possible; the command turns it into ``parallelnn: error: ...``.
"""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""

    def __init__(self, message: str):
        # Keep the message on one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))


class OutputError(UserError):
    """Results that could not be written (a full disk): one line, exit status 1, not a traceback."""

    exit_code = 1


def warn(message: str) -> None:
    print(f"parallelnn: warning: {message}", file=sys.stderr, flush=True)


def report_user_error(err: UserError) -> int:
    print(f"parallelnn: error: {err}", file=sys.stderr, flush=True)
    return getattr(err, "exit_code", EXIT_USER_ERROR)
