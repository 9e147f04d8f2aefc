"""Two kinds of error a user sees, and the one map from them to exit codes.

Every error orch raises for a user is a UserError (the input is wrong: a config, a flag, a reference, a data file;
the fix is in the message; exit 2) or a RunFailure (the input was fine but running it failed: a job, a system,
a download; exit 1). The CLI tells them apart by isinstance in one place (`exit_code`), never by class name, so
a new error class only has to pick its parent.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a run failed, or an unexpected error (a bug: one line + a traceback file)
EXIT_USAGE = 2  # bad input: the message says what to change
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM


class OrchError(Exception):
    """An error meant for the user: its message is the whole story (no traceback is shown)."""

    exit_code: int = EXIT_FAILED

    def lines(self) -> list[str]:
        """The message as the CLI prints it: one line (an error with several problems overrides this)."""
        return [" ".join(str(self).split("\n"))]


class UserError(OrchError):
    """Bad input (config, flag, reference, data, environment file): exit 2."""

    exit_code = EXIT_USAGE


class RunFailure(OrchError):
    """A run that failed (job, system, download): exit 1; `log_tail` carries the failing job's last log lines."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str = "", *, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


def exit_code(exc: BaseException) -> int | None:
    """The exit code for an error meant for the user; None for anything else (a bug, shown as one)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, OrchError):
        return exc.exit_code
    return None
