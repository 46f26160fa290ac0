"""The embedded sqlite tracking store under concurrent first use (charlm.tracking.sqlite_store):
four `charlm train --register` started together on a new store all succeed with four versions;
creation is serialized by the lock file and published last; a half-migrated database is refused
in one line that says how to recover."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

pytest_plugins = ["mlflow_fixtures"]
pytest.register_assert_rewrite("mlflow_fixtures")
from mlflow_fixtures import corpus_text  # noqa: E402

from charlm.tracking import sqlite_store  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Each process imports everything first, says so, then waits for the go file: the four first
# uses of the store then start within milliseconds of each other, as the bug needs.
_TRAIN = r"""
import os, sys, time
import charlm.cli, charlm.tracking, mlflow, torch
go = sys.argv[1]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
sys.exit(charlm.cli.main(sys.argv[2:]))
"""

_TINY = [
    "--cell",
    "lstm",
    "--num-layers",
    "1",
    "--hidden-size",
    "16",
    "--embed-size",
    "8",
    "--dropout",
    "0",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--max-steps",
    "4",
    "--eval-every",
    "2",
    "--precision",
    "fp32",
    "--seed",
    "3",
    "--json",
]


def _env(store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        CHARLM_STORE=str(store),
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_ENABLE_TELEMETRY="false",
        RAY_USAGE_STATS_ENABLED="0",
        DO_NOT_TRACK="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


@pytest.mark.slow
def test_four_concurrent_first_uses_of_a_new_store_register_four_versions(tmp_path):
    store = tmp_path / "store"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(5, 6_000))
    go = tmp_path / "go"
    procs = []
    try:
        for i in range(4):
            argv = ["train", str(corpus), "--out", str(tmp_path / f"out{i}"), "--register", "same"]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _TRAIN, str(go), *argv, *_TINY],
                    env=_env(store),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        db = store / "mlflow.db"
        assert not db.exists()  # a fresh store: its first use is the race
        go.touch()
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errors = [err[-1500:] for p, (_, err) in zip(procs, outs, strict=True) if p.returncode != 0]
    assert not errors, errors
    uris = sorted(
        json.loads(out.strip().splitlines()[-1])["mlflow"]["registered"]["model_uri"] for out, _ in outs
    )
    assert uris == [f"models:/same/{v}" for v in (1, 2, 3, 4)]

    from charlm import tracking

    listed = tracking.list_versions("same", tracking_uri=f"sqlite:///{db}")["versions"]
    assert sorted(v["version"] for v in listed) == [1, 2, 3, 4]
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.READY_MARK
        assert not [
            r for r in con.execute("SELECT name FROM sqlite_master") if r[0].startswith("_alembic_tmp")
        ]
    assert not list(store.glob("mlflow.db.tmp-*"))


# -- one process: the lock, the ready mark, half-migrated databases -----------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A database made by prepare once; tests copy it (prepare remembers the paths it made)."""
    db = tmp_path_factory.mktemp("pristine") / "mlflow.db"
    sqlite_store.prepare(f"sqlite:///{db}")
    return db


def _copy(pristine: Path, folder: Path) -> Path:
    db = folder / "mlflow.db"
    shutil.copyfile(pristine, db)
    return db


def _sql(db: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as con:
        for s in statements:
            con.execute(s)
        con.commit()


@contextlib.contextmanager
def _held(db: Path) -> Iterator[None]:
    """The lock prepare takes, held by this test."""
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_a_new_database_is_created_under_the_lock_and_published_last(tmp_path):
    db = tmp_path / "mlflow.db"
    stale = tmp_path / "mlflow.db.tmp-1-deadbeef"  # what a process killed while creating leaves
    stale.write_bytes(b"half a database")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sqlite_store.prepare(f"sqlite:///{db}")
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401 (imported: creating takes ~1 s)

    with _held(db):
        t = threading.Thread(target=run)
        t.start()
        time.sleep(3.0)
        # waits for the lock, touching nothing meanwhile
        assert t.is_alive() and not db.exists() and stale.exists()
    t.join(60)
    assert not t.is_alive() and not errors, errors
    assert not stale.exists() and not list(tmp_path.glob("mlflow.db.tmp-*"))
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.READY_MARK
        assert con.execute("SELECT name FROM experiments WHERE experiment_id = 0").fetchone() == ("Default",)


def test_a_ready_database_takes_no_lock(pristine, tmp_path):
    db = _copy(pristine, tmp_path)
    with _held(db):
        t = threading.Thread(target=sqlite_store.prepare, args=(f"sqlite:///{db}",), daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive()  # done while another process holds the lock


def test_an_unmarked_complete_database_is_switched_to_wal_and_marked(pristine, tmp_path):
    db = _copy(pristine, tmp_path)  # as MLflow itself (or charlm before the mark) left it
    _sql(db, "PRAGMA journal_mode=DELETE", "PRAGMA user_version=0")
    sqlite_store.prepare(f"sqlite:///{db}")
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.READY_MARK


def test_sqlalchemy_sqlite_connections_get_the_busy_timeout(tmp_path):
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with engine.connect() as c:
            got = c.exec_driver_sql("PRAGMA busy_timeout").fetchone()[0]
    finally:
        engine.dispose()
    assert got == int(sqlite_store.BUSY_TIMEOUT_S * 1000)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (
            "CREATE TABLE _alembic_tmp_tags (key VARCHAR(250))",
            r"half-migrated \(leftover table _alembic_tmp_tags",
        ),
        ("DROP TABLE alembic_version", r"half-migrated \(tables but no alembic revision"),
        ("DELETE FROM alembic_version", r"half-migrated \(tables but no alembic revision"),
        (
            "UPDATE alembic_version SET version_num = '451aebb31d03'",
            r"revision 451aebb31d03, not this MLflow's .*mlflow db upgrade",
        ),
        (
            "UPDATE alembic_version SET version_num = 'ffffffffffff'",
            r"revision ffffffffffff, unknown to MLflow",
        ),
    ],
)
def test_a_half_migrated_database_is_refused_in_one_line(pristine, tmp_path, breakage, expected):
    import re

    from charlm.cli import main

    db = _copy(pristine, tmp_path)
    _sql(db, breakage, "PRAGMA user_version=0")  # as the racing/killed migration left it: unmarked
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        rc = main(["models", "list", "any", "--tracking-uri", f"sqlite:///{db}"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 1 and len(lines) == 1, err.getvalue()
    assert lines[0].startswith(f"charlm: error: {db}: ") and re.search(expected, lines[0]), lines[0]
    assert "move it aside" in lines[0]
    assert "Traceback" not in err.getvalue()
    with contextlib.closing(sqlite3.connect(db)) as con:  # left as it was, for the user to recover
        assert con.execute("PRAGMA user_version").fetchone()[0] == 0


def test_a_leftover_migration_table_in_a_marked_database_is_refused_too(pristine, tmp_path):
    db = _copy(pristine, tmp_path)
    _sql(db, "CREATE TABLE _alembic_tmp_runs (x INTEGER)")
    with pytest.raises(sqlite_store.SqliteStoreError, match="leftover table _alembic_tmp_runs"):
        sqlite_store.prepare(f"sqlite:///{db}")


def test_a_file_that_is_no_database_is_refused_in_one_line(tmp_path):
    from charlm import tracking

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database at all" * 100)
    with pytest.raises(
        tracking.TrackingError, match=rf"^{db}: cannot read it as an MLflow tracking database .*move it aside"
    ):
        tracking.list_versions("any", tracking_uri=f"sqlite:///{db}")


def test_other_uris_are_left_alone():
    assert sqlite_store.sqlite_path("http://127.0.0.1:5000") is None
    assert sqlite_store.sqlite_path("sqlite://") is None
    assert sqlite_store.sqlite_path("sqlite:///:memory:") is None
    assert sqlite_store.sqlite_path("sqlite:////a/b/mlflow.db") == "/a/b/mlflow.db"
    assert sqlite_store.sqlite_path("sqlite:///rel.db") == os.path.abspath("rel.db")
    assert sqlite_store.sqlite_path("sqlite:not a url") is None
    sqlite_store.prepare("http://127.0.0.1:1")  # nothing to do, nothing contacted


def test_prepare_sqlite_for_a_server_sets_its_artifact_root_and_refuses_a_broken_file(tmp_path, capsys):
    from charlm.tracking.__main__ import main

    db = tmp_path / "new" / "mlflow-server.db"  # its folder is made too
    assert main(["prepare-sqlite", f"sqlite:///{db}", "mlflow-artifacts:/"]) == 0
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("SELECT artifact_location FROM experiments").fetchall() == [
            ("mlflow-artifacts:/0",)
        ]
    broken = tmp_path / "broken.db"
    shutil.copyfile(db, broken)
    _sql(broken, "DROP TABLE alembic_version", "PRAGMA user_version=0")
    capsys.readouterr()
    assert main(["prepare-sqlite", f"sqlite:///{broken}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"charlm: error: {broken}: MLflow tracking database left half-migrated"
    )
    assert main(["prepare-sqlite", "http://127.0.0.1:5050"]) == 2


@pytest.mark.slow
def test_a_process_killed_while_creating_the_database_leaves_none_behind(tmp_path):
    db = tmp_path / "mlflow.db"
    p = subprocess.Popen(
        [sys.executable, "-m", "charlm.tracking", "prepare-sqlite", f"sqlite:///{db}"],
        env=_env(tmp_path / "store"),
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("mlflow.db.tmp-*")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert p.poll() is None, "finished before it could be killed"
        p.kill()  # mid-migration: the temporary file exists, the database not yet
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert not db.exists() and list(tmp_path.glob("mlflow.db.tmp-*"))
    sqlite_store.prepare(f"sqlite:///{db}")  # the next use creates it whole
    assert not list(tmp_path.glob("mlflow.db.tmp-*"))
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.READY_MARK


def test_a_database_that_cannot_be_opened_is_reported_without_the_move_aside_advice(tmp_path):
    db = tmp_path / "mlflow.db"
    db.mkdir()  # opening fails: an operational error, not a broken database
    with pytest.raises(sqlite_store.SqliteStoreError) as e:
        sqlite_store.prepare(f"sqlite:///{db}")
    assert str(e.value).startswith(
        f"{db}: cannot read the tracking database ("
    ) and "move it aside" not in str(e.value)
