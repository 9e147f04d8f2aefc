"""PreflightError, the one error every pre-flight check raises, and the first line of a library's reason.

The checks live in several modules (preflight: the order of one run's checks; model_check, data_config_check,
tracking_check, outputs_check; devices); they share this error so the CLI shows each refusal as one line with
exit 2, whichever module found it.
"""

from __future__ import annotations

from orchestrator.core.errors import UserError


class PreflightError(UserError):
    """An input that cannot work: one line naming the field and the fix (raised before anything runs)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (its class name when it says nothing): a reason fit for one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
