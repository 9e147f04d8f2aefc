"""The local MLflow store (sqlite:///mlruns.db): created whole or not at all, and repaired when it is half-built.

MLflow creates a new SQLite store in place: the initial tables, then some thirty schema migrations, each
committed as it goes. A run killed meanwhile leaves a store at a middle revision, and every later start runs the
migrations again from that state and fails (`table ... already exists`): tracking is broken for good in that
folder. Here a new store is built beside the real name (`.mlruns.db.building-<id>`) by MLflow itself and moved
into place with one rename, so a kill leaves only a leftover that the next start removes; and a store found at a
middle revision that holds no runs (nothing to lose: a first run died creating it) is rebuilt the same way, the
broken file kept beside it. A store with runs at another revision is an older MLflow's, to upgrade by the user.
Callers hold the store's file lock (engine.tracking.Tracker).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import uuid
from pathlib import Path

from orchestrator.core.errors import UserError

SQLITE_MAGIC = b"SQLite format 3\x00"


class TrackingStoreError(UserError):
    """A local tracking store orch cannot use or repair: one line naming the file and the fix."""


def sqlite_db(uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI (relative paths against the working directory)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if not rest or rest == ":memory:" else Path(rest)


def is_sqlite_file(path: Path) -> bool:
    """An SQLite database by its header (an empty file is a new database to SQLite)."""
    with path.open("rb") as fh:
        head = fh.read(len(SQLITE_MAGIC))
    return head == b"" or head == SQLITE_MAGIC


def prepare_sqlite_store(uri: str) -> list[str]:
    """Make the store of a sqlite:/// URI whole before MLflow opens it; returns notes for the user (a repair).
    Call with the store's lock held."""
    db = sqlite_db(uri)
    if db is None:
        return []
    db = db.absolute()
    for leftover in db.parent.glob(f".{db.name}.building-*"):  # a creation killed midway (we hold the lock)
        with contextlib.suppress(OSError):
            leftover.unlink()
    if not db.exists() or db.stat().st_size == 0:
        _build_aside(db)
        return []
    if not is_sqlite_file(db):
        raise TrackingStoreError(
            f"tracking URI {uri}: {db} is not an SQLite database; move it away or give another --tracking-uri"
        )
    revision, runs = _store_state(db)
    head = _head_revision()
    if head is None or revision == head:
        return []
    check_store_schema(uri)
    kept = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
    _build_aside(db, replacing=kept)
    return [
        f"tracking store {db} was half-built (schema {revision or 'none'} of {head}, no runs: a first run was "
        f"stopped while MLflow created it); rebuilt it, the broken file is kept as {kept.name}"
    ]


def check_store_schema(uri: str) -> None:
    """Read-only (the pre-flight calls it): a store that holds runs at another schema revision than this MLflow
    writes is an older MLflow's (or one killed mid-upgrade), for the user to upgrade; refuse it in one line."""
    db = sqlite_db(uri)
    if db is None or not db.is_file() or db.stat().st_size == 0 or not is_sqlite_file(db):
        return
    revision, runs = _store_state(db)
    head = _head_revision()
    if head is None or revision == head or not runs:
        return  # whole, or repairable (nothing to lose): prepare_sqlite_store rebuilds it
    raise TrackingStoreError(
        f"tracking URI {uri}: the store {db} is at schema {revision or 'none'}, this MLflow needs {head}, and it "
        f"holds {runs} run(s): back it up, then run `mlflow db upgrade {uri}`, or give another --tracking-uri"
    )


def _store_state(db: Path) -> tuple[str | None, int]:
    """(alembic revision or None, runs + registered models stored), read with sqlite3 (MLflow not involved)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise TrackingStoreError(f"tracking store {db} cannot be opened ({exc})") from None
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revision = None
        if "alembic_version" in tables:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
        held = 0
        for table in ("runs", "registered_models"):
            if table in tables:
                held += conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed names
        return revision, held
    except sqlite3.DatabaseError as exc:
        raise TrackingStoreError(
            f"tracking store {db} is damaged ({exc}); move it away or give another --tracking-uri"
        ) from None
    finally:
        conn.close()


def _head_revision() -> str | None:
    """The schema revision this MLflow writes (None when MLflow's layout is not the one known here)."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return str(_get_latest_schema_revision())
    except Exception:  # an MLflow without this helper: leave the store to MLflow
        return None


def _build_aside(db: Path, *, replacing: Path | None = None) -> None:
    """MLflow creates the store under a temporary name beside `db`; one rename puts it in place (the file it
    replaces, if any, is first kept as `replacing`)."""
    import mlflow

    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.building-{uuid.uuid4().hex[:8]}")
    tmp_uri = f"sqlite:///{tmp}"
    try:
        mlflow.MlflowClient(tmp_uri).search_experiments(max_results=1)  # tables + every migration, MLflow's way
        _forget_engine(tmp_uri)
        if replacing is not None:
            os.replace(db, replacing)
        os.replace(tmp, db)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            with contextlib.suppress(OSError):
                leftover.unlink()
    _forget_engine(f"sqlite:///{db}")  # a pooled connection of this process must not hold the old file


def _forget_engine(uri: str) -> None:
    """Drop MLflow's cached SQLAlchemy engine of `uri` (its pool would keep the file it opened)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError:
        return
    engines = getattr(SqlAlchemyStore, "_engine_map", None)
    engine = engines.pop(uri, None) if isinstance(engines, dict) else None
    if engine is not None:
        engine.dispose()
