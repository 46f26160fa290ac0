"""Shared test fixtures: an S3-protocol server on loopback, buckets, a Prefect test server.

Importing this module (pytest does it first) isolates the session from the user's machine:
PREFECT_HOME and CHARLM_STORE point into a temporary folder, telemetry is off, and no
PREFECT_API_URL or AWS profile from the environment is used.

Fixtures for later issues to reuse:
  s3_server       (session) moto's S3 server on 127.0.0.1 with AWS_ENDPOINT_URL and dummy
                  credentials in os.environ for the whole session; yields the endpoint URL.
                  AWS_MAX_ATTEMPTS=1: botocore does not retry (callers' retries are under test).
  s3_bucket       (function) a new empty bucket; yields "s3://<name>".
  make_bucket     (function) factory: make_bucket(prefix="b") -> "s3://<name>".
  put_objects     (function) put_objects("s3://b/prefix" or a folder, {"key": bytes, ...}).
  seed_s3         (function) seed_s3("s3://b/prefix", {...}): bulk data without HTTP PUTs.
  prefect_harness (session) a temporary Prefect server + database for flow tests.
  tmp_store       (function) a fresh local store folder (as str).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator

import pytest

_SESSION_TMP = tempfile.mkdtemp(prefix="charlm-tests-")
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)


def _stop_local_prefect_server() -> None:
    """The local Prefect server a test's command started in the session's PREFECT_HOME (atexit
    runs this before the folder is removed)."""
    from charlm import prefect_server

    os.environ["PREFECT_HOME"] = os.path.join(_SESSION_TMP, "prefect")
    prefect_server.stop()


atexit.register(_stop_local_prefect_server)

os.environ["PREFECT_HOME"] = os.path.join(_SESSION_TMP, "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["CHARLM_STORE"] = os.path.join(_SESSION_TMP, "store")
os.environ.pop("PREFECT_API_URL", None)
for _var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
    os.environ.pop(_var, None)
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(_SESSION_TMP, "no-aws-credentials")
os.environ["AWS_CONFIG_FILE"] = os.path.join(_SESSION_TMP, "no-aws-config")


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1; stop()/start() keep the port and the data."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._cls = ThreadedMotoServer
        self.port = 0
        self._server = None
        self.start()

    def start(self) -> None:
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", server.endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_MAX_ATTEMPTS", "1")
        from charlm import storage

        storage.reset()
        try:
            yield server
        finally:
            server.stop()
            storage.reset()


@pytest.fixture
def make_bucket(s3_server: S3Server) -> Callable[..., str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint)

    def make(prefix: str = "b") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    return make


@pytest.fixture
def s3_bucket(make_bucket: Callable[..., str]) -> str:
    return make_bucket("test")


@pytest.fixture
def put_objects() -> Callable[[str, dict[str, bytes]], list[str]]:
    """Write objects under a URL prefix or folder (concurrently on S3); returns their URLs."""
    from charlm import storage

    def put(prefix: str, objects: dict[str, bytes]) -> list[str]:
        urls = [storage.join(prefix, k) for k in objects]
        if storage.is_local(prefix):
            for u, data in zip(urls, objects.values(), strict=True):
                os.makedirs(os.path.dirname(u), exist_ok=True)
                with open(u, "wb") as f:
                    f.write(data)
        else:
            fs, _ = storage.filesystem(prefix)
            fs.pipe({storage.filesystem(u)[1]: data for u, data in zip(urls, objects.values(), strict=True)})
        return urls

    return put


@pytest.fixture
def seed_s3(s3_server: S3Server) -> Callable[[str, dict[str, bytes]], None]:
    """Bulk test data straight into the in-process server's storage (no HTTP PUT per object);
    reading it back goes through the S3 protocol like everything else."""
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    def seed(prefix: str, objects: dict[str, bytes]) -> None:
        bucket, _, key_prefix = prefix.removeprefix("s3://").partition("/")
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
        for k, data in objects.items():
            backend.put_object(bucket, f"{key_prefix}/{k}" if key_prefix else k, data)

    return seed


@pytest.fixture
def tmp_store(tmp_path: os.PathLike) -> str:
    return str(os.path.join(tmp_path, "store"))


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
        prefect_test_harness(server_startup_timeout=60),
    ):
        yield
