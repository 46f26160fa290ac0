"""MLflow fixtures for test_tracking.py and test_registry.py (a plugin they load).

mlflow_server   (session) a real `mlflow server` process started by infra/mlflow-server.sh on
                127.0.0.1 (free port, sqlite backend in a temp folder, one worker, job execution
                off) with artifacts in a bucket of the test S3 server. One process per session,
                however many modules import the fixture.
sqlite_tracking (session) a sqlite tracking URI in a temp folder.
tracking        (parametrized) each of the two, as a Backend(kind, uri, server).
tiny_datasets   (session) two published datasets in the session store: "main" (the corpus every
                test trains on; its manifest lists a source URL with a sentinel password) and
                "narrow" (a corpus with fewer characters: a model trained on it cannot encode
                all of main's test split).
train_tiny      factory: train a tiny model in a few hundred milliseconds, optionally tracked.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_REGISTRY_URI", None)
os.environ.pop("CHARLM_MLFLOW_EXPERIMENT", None)

REPO = Path(__file__).resolve().parent.parent
# A secret that must never reach MLflow: in a secret-looking environment variable and as the
# password of a source URL in the main dataset's manifest.
SENTINEL = "s3ntinel-" + uuid.uuid4().hex
os.environ["CHARLM_TEST_API_TOKEN"] = SENTINEL
SECRET_URL = f"https://reader:{SENTINEL}@corpora.example.invalid/tiny.txt"

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "jovial",
    "boxers",
    "and",
    "many",
    "fine",
    "gardens",
    "grow",
    "under",
    "bright",
    "summer",
    "skies",
]


def corpus_text(seed: int, n_chars: int, words: tuple[str, ...] | list[str] = WORDS) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
        line = line[0].upper() + line[1:] + rng.choice(".!?") + "\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


@dataclass
class MlflowServer:
    uri: str
    bucket: str
    prefix: str
    log: Path
    proc: subprocess.Popen

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # the server and its workers: the group we started
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(s3_endpoint: str) -> MlflowServer:
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    folder = Path(tempfile.mkdtemp(prefix="charlm-mlflow-server-"))
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_PORT": str(port),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{folder}/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/mlflow",
        "MLFLOW_BIN": str(Path(sys.executable).with_name("mlflow")),
        "CHARLM_HOME": str(folder),
    }
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", str(REPO / "infra" / "mlflow-server.sh")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    server = MlflowServer(uri, bucket, "mlflow", log, proc)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"mlflow server not ready after 90 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def mlflow_server(s3_server: Any) -> Iterator[MlflowServer]:
    server = _start_server(s3_server.endpoint)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sqlite_tracking() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="charlm-mlflow-sqlite-")
    yield f"sqlite:///{folder}/mlflow.db"
    shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Backend:
    kind: str  # "sqlite" | "server"
    uri: str
    server: MlflowServer | None = None


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def tracking(request: pytest.FixtureRequest) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", request.getfixturevalue("sqlite_tracking"))
    server = request.getfixturevalue("mlflow_server")
    return Backend("server", server.uri, server)


@pytest.fixture(scope="session")
def tiny_datasets() -> Iterator[dict[str, Any]]:
    from charlm import ingest

    folder = Path(tempfile.mkdtemp(prefix="charlm-mlflow-data-"))
    store = str(folder / "store")  # a store of its own: other tests' listings stay as they expect
    out = {}
    texts = {
        "main": corpus_text(0, 24_000),
        "narrow": corpus_text(
            1, 12_000, [w for w in WORDS if "q" not in w and "x" not in w and "z" not in w]
        ),
    }
    policies = ingest.Policies(val_frac=0.1, test_frac=0.1)
    for name, text in texts.items():
        src = folder / "corpora" / name
        src.mkdir(parents=True)
        (src / f"{name}.txt").write_text(text)
        scans = [ingest.scan_object(o, policies) for o in ingest.list_sources([str(src)])]
        requested = [str(src)] + ([SECRET_URL] if name == "main" else [])
        r = ingest.publish(scans, policies, store, name=f"tiny-{name}", requested=requested)
        out[name] = r["id"]
    out["store"] = store
    yield out
    shutil.rmtree(folder, ignore_errors=True)


def tiny_config(**overrides: Any):
    from charlm.config import TrainConfig

    base = dict(
        cell="lstm",
        num_layers=1,
        hidden_size=48,
        embed_size=16,
        dropout=0.0,
        seq_len=32,
        batch_size=8,
        lr=1e-2,
        warmup_steps=0,
        max_steps=60,
        eval_every=20,
        log_every=5,
        precision="fp32",
        val_frac=0.1,
        test_frac=0.1,
        seed=3,
    )
    base.update(overrides)
    return TrainConfig(**base)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def artifact_files(client: Any, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact path of a run, recursively."""
    out = []
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out += artifact_files(client, run_id, f.path)
        else:
            out.append(f.path)
    return sorted(out)
