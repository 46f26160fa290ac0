"""The embedded sqlite tracking database, made safe for many charlm processes at once.

MLflow creates and migrates a new sqlite database in whichever process touches it first, with no
lock between processes: two commands starting together on a new store both migrate it, both fail
(``table _alembic_tmp_tags already exists``), and the half-migrated file stays broken. So before
MLflow sees a sqlite file, :func:`prepare`

* creates and migrates a missing database under an exclusive ``flock`` on ``<db>.lock`` beside it,
  in a temporary file that is renamed into place only when complete (a process killed while
  migrating leaves no half-made database behind);
* switches the database to WAL journaling (persistent on the file: readers no longer block the
  writer) and marks it ready in its header (``PRAGMA user_version``); a process that finds the mark
  takes no lock;
* refuses a database that a migration left half-done (leftover ``_alembic_tmp_*`` tables, tables
  without an alembic revision, a revision that is not this MLflow's head) in one line naming the
  file and how to recover, before MLflow or alembic print their own tracebacks.

Importing this module also gives every pysqlite connection SQLAlchemy opens in the process a busy
timeout of :data:`BUSY_TIMEOUT_S` (pysqlite's default is 5 s), so a writer waits for another
instead of failing with "database is locked". MLflow's own sessions set 20 s themselves; this
covers its engine checks and alembic migrations too.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

BUSY_TIMEOUT_S = 60.0  # how long a connection waits for another process's write lock
LOCK_TIMEOUT_S = 300.0  # how long a process waits for another to create/check the database
READY_MARK = 0x63686C6D  # PRAGMA user_version of a database charlm checked and set up ("chlm")
_TMP_PREFIX = "_alembic_tmp_"

_ready: set[str] = set()  # database files prepared by this process
_ready_lock = threading.Lock()


class SqliteStoreError(ValueError):
    """A sqlite tracking database that cannot be used; one line naming the file and the remedy."""


@event.listens_for(Engine, "do_connect")
def _busy_timeout(dialect: Any, conn_rec: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
    """A pysqlite connection without an explicit timeout waits BUSY_TIMEOUT_S for locks."""
    if dialect.name == "sqlite" and dialect.driver == "pysqlite":
        cparams.setdefault("timeout", BUSY_TIMEOUT_S)


def sqlite_path(uri: str) -> str | None:
    """The absolute path of the database file of a sqlite URI; None for other URIs and for
    in-memory databases."""
    if not uri.lower().startswith("sqlite:"):
        return None
    try:
        database = make_url(uri).database
    except ArgumentError:  # not a URL at all: MLflow says so itself
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database)


def prepare(uri: str, artifact_root: str | None = None) -> None:
    """Make the sqlite database of uri ready for MLflow (see the module's docstring); nothing for
    other URIs. artifact_root: where the Default experiment of a new database keeps artifacts
    (default: mlflow-artifacts beside the database). Raises SqliteStoreError."""
    db = sqlite_path(uri)
    if db is None or db in _ready:
        return
    with _ready_lock:
        if db in _ready:
            return
        state = _inspect(db)
        if not (state and state.ready and not state.leftovers):
            os.makedirs(os.path.dirname(db), exist_ok=True)
            with _exclusive(db):
                _prepare_locked(db, artifact_root)
        _ready.add(db)


@dataclass(frozen=True)
class _State:
    user_version: int
    tables: frozenset[str]
    revision: str | None

    @property
    def ready(self) -> bool:
        return self.user_version == READY_MARK

    @property
    def leftovers(self) -> list[str]:
        return sorted(t for t in self.tables if t.startswith(_TMP_PREFIX))


def _connect(db: str) -> sqlite3.Connection:
    """A connection to an existing database file (never creates one)."""
    return sqlite3.connect(f"{Path(db).as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S)


def _inspect(db: str) -> _State | None:
    """The database's mark, tables and alembic revision; None when there is no file yet."""
    if not os.path.exists(db):
        return None
    try:
        with contextlib.closing(_connect(db)) as con:
            user_version = con.execute("PRAGMA user_version").fetchone()[0]
            tables = frozenset(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'"))
            revision = None
            if "alembic_version" in tables:
                row = con.execute("SELECT version_num FROM alembic_version").fetchone()
                revision = row[0] if row else None
    except sqlite3.OperationalError as e:  # locked past the timeout, no permission, ...
        raise SqliteStoreError(f"{db}: cannot read the tracking database ({e})") from None
    except sqlite3.DatabaseError as e:  # not a database, corrupt
        raise SqliteStoreError(
            f"{db}: cannot read it as an MLflow tracking database ({e}); {_move_aside(db)}"
        ) from None
    return _State(user_version, tables, revision)


@contextlib.contextmanager
def _exclusive(db: str) -> Iterator[None]:
    """An exclusive flock on <db>.lock (created if missing, never removed)."""
    lock_path = db + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SqliteStoreError(
            f"{lock_path}: cannot create the tracking database's lock file ({e.strerror})"
        ) from None
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SqliteStoreError(
                        f"{lock_path}: still held by another process after {LOCK_TIMEOUT_S:.0f} s "
                        "(one creating or checking the tracking database); is it stuck?"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _prepare_locked(db: str, artifact_root: str | None) -> None:
    """Under the lock: create a missing (or empty) database, else check and finish an existing one."""
    for stale in glob.glob(glob.escape(db) + ".tmp-*"):  # left by a process killed while creating
        with contextlib.suppress(OSError):
            os.remove(stale)
    state = _inspect(db)
    if state is None or not state.tables:
        _create(db, artifact_root)
        return
    if state.ready and not state.leftovers:
        return  # another process finished it while this one waited
    _check(db, state)
    with contextlib.closing(_connect(db)) as con:
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() == "wal":  # else busy: left unmarked, so a later process retries
            con.execute(f"PRAGMA user_version={READY_MARK}")


def _create(db: str, artifact_root: str | None) -> None:
    """MLflow's own store creates and migrates the database in a temporary file beside db, which
    is set to WAL, marked ready and renamed into place last."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = f"{db}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    root = artifact_root or Path(os.path.dirname(db), "mlflow-artifacts").as_uri()
    try:
        store = SqlAlchemyStore("sqlite:///" + tmp, root)
        store.engine.dispose()  # every connection closed before the file moves
        with contextlib.closing(_connect(tmp)) as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA user_version={READY_MARK}")
        for suffix in ("-wal", "-shm", "-journal"):  # orphans of a database moved away
            with contextlib.suppress(FileNotFoundError):
                os.remove(db + suffix)
        os.replace(tmp, db)
    finally:
        for path in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _move_aside(db: str) -> str:
    return (
        f"move it aside (mv {db} {db}.broken, with any {os.path.basename(db)}-wal/-shm beside it) "
        "and run again to start a new one, or restore a backup"
    )


def _check(db: str, state: _State) -> None:
    """A SqliteStoreError unless the database is at this MLflow's head revision with no
    leftovers of an interrupted migration."""
    import mlflow.store
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    migrations = os.path.join(os.path.dirname(mlflow.store.__file__), "db_migrations")
    script = ScriptDirectory(migrations)
    head = script.get_current_head()
    broken = "MLflow tracking database left half-migrated"
    if state.leftovers:
        why = f"leftover table {state.leftovers[0]} of an interrupted migration"
        raise SqliteStoreError(f"{db}: {broken} ({why}); {_move_aside(db)}")
    if state.revision is None:
        why = "tables but no alembic revision: its first migration was interrupted"
        raise SqliteStoreError(f"{db}: {broken} ({why}); {_move_aside(db)}")
    if state.revision == head:
        return
    try:
        script.get_revision(state.revision)
    except CommandError:
        raise SqliteStoreError(
            f"{db}: MLflow tracking database at schema revision {state.revision}, unknown to "
            f"MLflow {_mlflow_version()} (made by a newer MLflow?): use that MLflow, or {_move_aside(db)}"
        ) from None
    raise SqliteStoreError(
        f"{db}: MLflow tracking database at schema revision {state.revision}, not this MLflow's "
        f"{head} (made by an older MLflow, or a migration was interrupted): back it up, then run "
        f"'mlflow db upgrade sqlite:///{db}'; if that fails, {_move_aside(db)}"
    )


def _mlflow_version() -> str:
    import mlflow

    return mlflow.__version__
