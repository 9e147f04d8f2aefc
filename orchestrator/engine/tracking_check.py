"""The tracking URI checked before anything runs: an MLflow server answers, a SQLite store's file can be
written and is an MLflow database, a scheme is one MLflow knows. A run that cannot record its metrics is
refused in seconds, not after its passes ran. Credentials in a URI never reach a message (redacted).
"""

from __future__ import annotations

import os
import re

from orchestrator.core.links import link_problem
from orchestrator.core.redact import redact
from orchestrator.engine.outputs_check import check_writable_dir
from orchestrator.engine.preflight_error import PreflightError, first_line

TRACKING_SCHEMES = (
    "http", "https", "sqlite", "file", "postgresql", "postgres", "mysql", "mssql", "databricks", "databricks-uc",
    "azureml", "uc",
)  # fmt: skip


def check_tracking_uri(uri: str, timeout: float = 3.0) -> None:
    """An http(s) MLflow server answers /health within seconds; a sqlite store's folder is writable."""
    if uri.startswith(("http://", "https://")):
        import time
        import urllib.error
        import urllib.request
        from urllib.parse import urlsplit, urlunsplit

        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018  (raises for a port that is not a number)
        except ValueError as exc:
            raise PreflightError(
                f"tracking URI {redact(uri)} is not a valid URL ({exc}); write e.g. http://127.0.0.1:5000"
            ) from None
        host = parts.netloc.rsplit("@", 1)[-1]  # credentials stay out of the probe (and of urllib's parser)
        if not host:
            raise PreflightError(f"tracking URI {redact(uri)} has no host; write e.g. http://127.0.0.1:5000")
        bare = urlunsplit((parts.scheme, host, parts.path, "", ""))
        context = None
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":  # as the MLflow client does
            import ssl

            context = ssl._create_unverified_context()  # noqa: S323
        started = time.monotonic()
        try:
            with urllib.request.urlopen(  # noqa: S310
                bare.rstrip("/") + "/health", timeout=timeout, context=context
            ) as resp:
                resp.read(64)
        except urllib.error.HTTPError:
            return  # it answered: a proxy or an old server without /health; the client reports auth errors itself
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PreflightError(
                f"tracking URI {redact(uri)} does not answer ({first_line(reason)}, after "
                f"{time.monotonic() - started:.1f}s); start the MLflow server, give another --tracking-uri, or "
                "run with --no-tracking"
            ) from None
    elif uri.startswith("sqlite:///"):
        from orchestrator.engine.mlflow_store import check_store_schema, is_sqlite_file, sqlite_db

        db = sqlite_db(uri)
        if db is None:
            if uri.split("?", 1)[0] != "sqlite:///:memory:":
                raise PreflightError(f"tracking URI {uri} names no database file; write e.g. sqlite:///mlruns.db")
            return
        problem = link_problem(db)
        if problem:
            raise PreflightError(f"tracking URI {uri}: {problem}; give another --tracking-uri")
        if db.exists() and not db.is_file():
            raise PreflightError(f"tracking URI {uri}: {db} is a folder; give the path of a .db file")
        check_writable_dir(f"tracking URI {uri}: the folder", db.absolute().parent)
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise PreflightError(f"tracking URI {uri}: {db} is not writable; give another --tracking-uri")
        if db.exists() and not is_sqlite_file(db):
            raise PreflightError(
                f"tracking URI {uri}: {db} is not an SQLite database; give the path of an MLflow .db file "
                "(a new name creates one)"
            )
        check_store_schema(uri)
    elif uri.startswith("sqlite:"):
        raise PreflightError(
            f"tracking URI {redact(uri)}: a SQLite URI has three slashes before a relative path "
            "(sqlite:///mlruns.db) and four before an absolute one (sqlite:////home/me/mlruns.db)"
        )
    elif "://" in uri or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\\/]", uri):
        scheme = uri.split(":", 1)[0].lower()
        if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
            raise PreflightError(
                f"tracking URI {redact(uri)}: unknown scheme {scheme!r}; MLflow takes http(s)://host:port, "
                "sqlite:///file.db, file:/folder, postgresql://, mysql://, databricks or azureml://"
            )
