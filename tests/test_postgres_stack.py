"""The team stack on PostgreSQL: `infra/local-stack.sh start --postgres` runs MLflow's and
Prefect's servers on databases of a PostgreSQL cluster of its own (127.0.0.1, free ports, a temp
stack folder). A tracked, registered tiny training, its promotion and a Prefect flow run (an
ingest) go through it; the versions, the alias and the flow run are read back through MLflow's
client and Prefect's API, and straight from the databases (so a server that fell back to sqlite
fails). Skipped, with the reason, where PostgreSQL's server is not installed (scripts/system-deps
installs it in CI)."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow_fixtures import corpus_text
from test_local_stack import free_ports, ports, run_script, stack_env

pytestmark = pytest.mark.slow

CHARLM = str(Path(sys.executable).with_name("charlm"))
TINY = ["--hidden-size", "32", "--embed-size", "8", "--batch-size", "4", "--seq-len", "16", "--lr", "1e-2"]


def _postgres_missing() -> str | None:
    if os.environ.get("CHARLM_PG_BIN"):
        return None
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and not shutil.which("initdb"):
        return (
            "PostgreSQL's server (initdb, pg_ctl) is not installed: Debian's postgresql package "
            "(scripts/system-deps installs it as root with apt-get)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(os.environ.get("CHARLM_PG_OS_USER", "postgres"))
        except KeyError:
            return "running as root and no 'postgres' OS user to run PostgreSQL as"
    return None


def _exports(stdout: str) -> dict[str, str]:
    """The variables of `export A=1 B=2` lines (no quoting in the stack's env)."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            for pair in line.removeprefix("export ").split():
                k, _, v = pair.partition("=")
                out[k] = v
    return out


def _charlm(env: dict[str, str], *args: str, timeout: float = 300) -> dict:
    res = subprocess.run([CHARLM, *args, "--json"], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"charlm {' '.join(args)}: {res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def _api(url: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _sql(port: int, db: str, query: str, *params: object) -> list[tuple]:
    import psycopg  # the postgres extra

    with psycopg.connect(host="127.0.0.1", port=port, user="charlm", dbname=db, connect_timeout=10) as conn:
        return conn.execute(query, params).fetchall()


def test_registry_and_flows_on_the_postgres_stack(tmp_path) -> None:
    reason = _postgres_missing()
    if reason:
        pytest.skip(reason)
    # the stack folder in /tmp, reachable by the postgres OS user when this runs as root
    stack = Path(tempfile.mkdtemp(prefix="charlm-pg-stack-"))
    stack.chmod(0o755)
    s3, mlflow, prefect, pg = free_ports(4)
    env = stack_env(stack, s3, mlflow, prefect, pg)
    try:
        took = {"begin": time.monotonic()}
        up = run_script(env, "start", "--postgres", timeout=300)
        took["start"] = time.monotonic()
        assert up.returncode == 0, up.stderr[-3000:]
        data = Path((stack / "postgres.data").read_text().strip())
        assert data == stack / "postgres" and (data / "PG_VERSION").is_file()

        st = run_script(env, "status").stdout
        for name, port in {"s3": s3, "mlflow": mlflow, "prefect": prefect, "postgres": pg}.items():
            line = next(x for x in st.splitlines() if x.startswith(f"{name}: "))
            assert line.startswith(f"{name}: running (pid ") and f"127.0.0.1:{port} served by pid " in line
            assert line.endswith(", this stack's"), line

        cli = {**env, **_exports(up.stdout)}
        assert cli["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow}"
        corpus = tmp_path / "corpus" / "tiny.txt"
        corpus.parent.mkdir()
        corpus.write_text(corpus_text(7, 12_000))
        dataset = f"pgtiny-{uuid.uuid4().hex[:8]}"
        ingested = _charlm(cli, "ingest", str(corpus.parent), "--name", dataset)  # a Prefect flow run
        assert ingested["url"].startswith("s3://charlm/store/datasets/")
        took["ingest"] = time.monotonic()

        model = f"pg-{uuid.uuid4().hex[:8]}"
        steps = ["--max-steps", "6", "--eval-every", "3", "--precision", "fp32", *TINY]
        summary = _charlm(cli, "train", dataset, "--out", str(tmp_path / "run"), *steps, "--register", model)
        assert summary["mlflow"]["registered"]["version"] == 1
        took["train"] = time.monotonic()
        _charlm(cli, "models", "promote", model, "1", "--alias", "champion")
        took["promote"] = time.monotonic()

        from mlflow import MlflowClient

        client = MlflowClient(
            tracking_uri=cli["MLFLOW_TRACKING_URI"], registry_uri=cli["MLFLOW_TRACKING_URI"]
        )
        versions = client.search_model_versions(f"name = '{model}'")
        assert [int(v.version) for v in versions] == [1]
        assert int(client.get_model_version_by_alias(model, "champion").version) == 1
        assert versions[0].run_id == summary["mlflow"]["run_id"]
        assert client.get_run(versions[0].run_id).info.status == "FINISHED"

        flows = _api(
            f"http://127.0.0.1:{prefect}/api/flow_runs/filter",
            {"flows": {"name": {"any_": ["ingest-corpus"]}}},
        )
        assert [f["state_type"] for f in flows] == ["COMPLETED"]

        # ... and all of it lives in PostgreSQL, not in a sqlite file beside the stack
        assert _sql(pg, "mlflow", "select version from model_versions where name = %s", model) == [(1,)]
        assert _sql(
            pg, "mlflow", "select alias, version from registered_model_aliases where name = %s", model
        ) == [("champion", 1)]
        assert _sql(
            pg,
            "prefect",
            "select r.state_type::text from flow_run r join flow f on f.id = r.flow_id where f.name = %s",
            "ingest-corpus",
        ) == [("COMPLETED",)]
        assert not (stack / "mlflow.db").exists() and not list(stack.glob("prefect/*.db"))
    finally:
        down = run_script(env, "stop", timeout=180)
        took["stop"] = time.monotonic()
        marks = list(took.items())
        print("seconds:", ", ".join(f"{k} {t - marks[i][1]:.1f}" for i, (k, t) in enumerate(marks[1:])))
        pids = {p.stem: int(p.read_text()) for p in stack.glob("*.pid")}  # left only when stop failed
        for pid in pids.values():
            subprocess.run(["kill", "-KILL", "--", f"-{pid}"], check=False, capture_output=True)
        shutil.rmtree(stack, ignore_errors=True)
    assert down.returncode == 0 and not pids, down.stderr
    for port in (s3, mlflow, prefect, pg):
        assert ports.holders(port) == []
