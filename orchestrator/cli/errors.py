"""One-line errors and the exit code map: every exception a command raises becomes `orch: error: ...` and a
code by isinstance (core.errors: 2 bad input, 1 a failed run, 130 interrupted), never a traceback (an unexpected
error: one line + its traceback in a file)."""

from __future__ import annotations

import errno
import os
from typing import Any

import typer
from rich.text import Text

from orchestrator.cli.app import Verbosity, console
from orchestrator.core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, RunFailure, UserError


def _redact(text: str) -> str:
    """Secrets out of a line: by shape (URI credentials, token formats) and the exact values this run knows."""
    from orchestrator.core.redact import mask

    return mask(text)


MAX_LINE = 2000  # characters of an error line; longer runs of text (paths of a runaway copy) are cut


def error_line(message: str) -> None:
    """`orch: error: <message>` on one line; the message is plain text (never rich markup: `[...]` survives),
    with credentials inside URIs masked and runaway paths cut to their head and tail."""
    line = " ".join(_redact(str(message)).split("\n"))
    if len(line) > MAX_LINE:
        from orchestrator.core.links import short

        line = " ".join(short(word) for word in line.split(" "))[: MAX_LINE * 2]
    console.print(Text("orch: error: ", style="bold red") + Text(line), highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_USAGE, detail: str = "") -> typer.Exit:
    error_line(message)
    if detail:
        console.print(_redact(detail), style="dim", highlight=False, markup=False)
    return typer.Exit(code)


def _guarded(fn: Any, *, interrupted: str = "interrupted; the running job was stopped") -> Any:
    """Turn the errors a user can act on into one line + a non-zero exit (core.errors: the one code map); Ctrl-C
    exits 130 with `interrupted`, which says what was stopped."""
    from orchestrator.core.cache import Cache  # noqa: F401  (cheap; keeps import errors out of the handler)
    from orchestrator.core.redact import masked_output

    try:
        with masked_output():  # every line printed here or by a library (MLflow, transformers) hides secrets
            return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise fail(interrupted, EXIT_INTERRUPTED) from None
    except Exception as exc:  # classified below; anything else is a bug: one line + its traceback in a file
        raise classify(exc) from None


def classify(exc: Exception) -> typer.Exit:
    """The one place an exception becomes what the user sees and the exit code (by isinstance, not by name)."""
    if isinstance(exc, UserError):
        for line in exc.lines():
            error_line(line)
        return typer.Exit(exc.exit_code)
    if isinstance(exc, ImportError) and (hint := _install_hint(exc)):  # an extra that is not installed
        return fail(f"{_command_path()} {hint}")
    azure = azure_error(exc)
    if azure is not None:
        return azure
    if type(exc).__module__.startswith("mlflow."):  # the tracking server failed mid-run
        return fail(f"tracking failed: {_first(exc)} (rerun with --no-tracking to skip MLflow)", EXIT_FAILED)
    if isinstance(exc, RunFailure):
        # the one line names the pass, the cause and the full log's path; the tail only when it has no log
        tail = "" if "full log: " in str(exc) else exc.log_tail
        return fail(str(exc), exc.exit_code, tail)
    if isinstance(exc, OSError) and exc.errno in USER_OS_ERRORS:
        return fail(_os_error_line(exc), EXIT_USAGE)
    return fail(f"internal error: {_first(exc)}; traceback in {_crash_log(exc)} (please report it)", EXIT_FAILED)


# Errors of the user's machine, not of orch: a full disk or quota, a read-only or forbidden folder, a link loop.
USER_OS_ERRORS = {
    errno.ENOSPC: "no space left on its disk: free space there or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space there or choose another folder",
    errno.EROFS: "it is on a read-only filesystem: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "the operation is not permitted there: choose another folder",
    errno.ELOOP: "a symlink on the way leads back to itself: remove the loop",
    errno.ENAMETOOLONG: "the path is too long (a folder inside itself?): choose a shorter path",
}


def _os_error_line(exc: OSError) -> str:
    from orchestrator.core.links import short

    where = exc.filename or exc.filename2
    return f"{short(where) if where else 'a file orch writes'}: {USER_OS_ERRORS[exc.errno]}"


def _install_hint(exc: ImportError) -> str | None:
    from orchestrator.core.extras import install_hint

    return install_hint(getattr(exc, "name", None))


def _command_path() -> str:
    """`orch run`, `orch demo`, ...: the command being run, for one-line errors."""
    try:
        from typer._click.globals import get_current_context  # typer >= 0.20 vendors click
    except ImportError:  # pragma: no cover - older typer
        from click import get_current_context
    ctx = get_current_context(silent=True)
    return ctx.command_path if ctx is not None else " ".join(["orch", *Verbosity.command])


AZ_LOGIN_HINT = (
    "sign in with `az login` (or set AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET for a service "
    "principal); the workspace orch uses: `orch config show`"
)


def azure_error(exc: BaseException) -> typer.Exit | None:
    """Azure SDK errors a user acts on, as one line: a credential that got no token (exit 2, with the sign-in
    hint; azure-identity's own per-credential lines are filtered, see _quiet_libraries), a name that does not
    exist in the workspace (exit 2). Other service errors are failed runs (exit 1). None: not an Azure error."""
    if not type(exc).__module__.startswith("azure."):
        return None
    from azure.core.exceptions import HttpResponseError

    user = azure_user_error(exc)
    if user is not None:
        return user
    if isinstance(exc, HttpResponseError):
        return fail(f"Azure ML: {_first_line(exc)}", EXIT_FAILED)
    return None


def azure_user_error(exc: BaseException) -> typer.Exit | None:
    """The Azure errors that are the user's to fix (exit 2): no token for any credential, an unknown name."""
    if not type(exc).__module__.startswith("azure."):
        return None
    from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError

    if isinstance(exc, ClientAuthenticationError):
        return fail(f"Azure credentials: {_credential_summary(exc)}; {AZ_LOGIN_HINT}")
    if isinstance(exc, ResourceNotFoundError):
        return fail(f"not found in the Azure ML workspace: {_first_line(exc)}")
    return None


def _credential_summary(exc: BaseException) -> str:
    """DefaultAzureCredential's message lists every credential it tried, one per line: the one that failed (not
    merely unavailable) says what went wrong; if none could even try, their names say what was looked for."""
    import re

    attempts = [m.groups() for m in re.finditer(r"^\s*(\w+Credential): (.*)$", str(exc), re.MULTILINE)]
    failed = [f"{name}: {why}" for name, why in attempts if "unavailable" not in why.lower()]
    if failed:
        return failed[0] if len(failed[0]) <= 300 else failed[0][:297] + "..."
    if attempts:
        return "no credential could sign in (tried " + ", ".join(name for name, _ in attempts) + ")"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    """The first meaningful line of an SDK message (azure-identity's run to 15 lines, one per credential)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.lower().startswith(("attempted credentials", "to mitigate", "visit"))]
    text = (useful or lines or [type(exc).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _crash_log(exc: BaseException) -> str:
    """Write the traceback of an unexpected error to a file in the temp folder; returns its path."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="orch-error-", suffix=".log")
    with os.fdopen(fd, "w") as fh:
        fh.write(_redact("".join(traceback.format_exception(exc))))
    return path
