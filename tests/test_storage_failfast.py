"""Storage fails fast: S3 timeouts and one retry budget ($CHARLM_STORAGE_RETRY_S), and the store
and sources checked before any work, against a moto server this module stops and restarts.

moto's ThreadedMotoServer runs in this process and keeps its buckets in module state, so a
server stopped and started again on the same port (conftest.S3Server) still has them: a restart
is a blip of the endpoint only, as with a real server whose data is on disk.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest
from conftest import S3Server

from charlm import cli, ingest, storage, storage_check
from charlm.ingest import Policies
from charlm.storage_retry import BUDGET_ENV, RetryBudget, StorageError, StorageUnreachableError

UNREACHABLE = r"unreachable at http://127\.0\.0\.1:{port} \(connection refused; (\d+) tries in ([\d.]+) s\)$"


@pytest.fixture
def own_s3(monkeypatch: pytest.MonkeyPatch):
    """A moto server of this test's own, with the default budget (no AWS_MAX_ATTEMPTS cap)."""
    server = S3Server()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    storage.reset()
    storage_check._passed.clear()
    yield server
    server.stop()
    storage.reset()
    storage_check._passed.clear()


def _bucket(server: S3Server, name: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def _keys(server: S3Server, bucket: str) -> list[str]:
    import boto3

    out = boto3.client("s3", endpoint_url=server.endpoint).list_objects_v2(
        Bucket=bucket.removeprefix("s3://")
    )
    return [o["Key"] for o in out.get("Contents", [])]


def _no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("the corpus was read before the store was checked")

    monkeypatch.setattr(ingest, "list_sources", refuse)
    monkeypatch.setattr(storage, "list_objects", refuse)
    monkeypatch.setattr(storage, "open_read", refuse)


def _cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[str, float]:
    start = time.monotonic()
    assert cli.main(argv) == 1
    took = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line
    return err[0], took


# -- the budget ------------------------------------------------------------------------------------------
def test_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    b = RetryBudget.from_env()
    # s3fs waits 0.1 * 1.7**i s after try i: nine tries' waits (9.8 s) fit in 10 s, ten do not
    assert (b.seconds, b.max_tries, b.connect_timeout, b.read_timeout) == (10.0, 9, 2.5, 10.0)
    assert b.botocore_config()["retries"] == {"total_max_attempts": 1, "mode": "standard"}
    monkeypatch.setenv(BUDGET_ENV, "0")
    assert RetryBudget.from_env().max_tries == 1
    monkeypatch.setenv(BUDGET_ENV, "30")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # botocore's own setting caps the tries
    assert RetryBudget.from_env().max_tries == 3
    monkeypatch.setenv(BUDGET_ENV, "soon")
    with pytest.raises(StorageError, match=rf"^{BUDGET_ENV}='soon': not a number of seconds"):
        RetryBudget.from_env()


# -- local stores and --out -------------------------------------------------------------------------------
def test_store_or_out_naming_a_file_is_refused_before_the_corpus_is_read(
    tmp_path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("some text\n" * 20)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    _no_reading(monkeypatch)
    line, _ = _cli_error(capsys, ["ingest", str(tmp_path / "c"), "--store", str(afile)])
    assert line == f"charlm: error: {afile}: the store is a file, not a folder (Not a directory)"
    line, _ = _cli_error(capsys, ["ingest", str(tmp_path / "c"), "--store", str(afile / "sub")])
    assert line == (
        f"charlm: error: {afile / 'sub'}: cannot create the store folder, {afile} is a file (Not a directory)"
    )
    line, _ = _cli_error(capsys, ["train", str(tmp_path / "c"), "--out", str(afile), "--no-track"])
    assert line == f"charlm: error: {afile}: --out is a file, not a folder (Not a directory)"
    assert afile.read_text() == "not a folder"
    storage_check.check_local_folder(str(tmp_path / "new" / "store"), "the store")  # creatable: fine
    assert not (tmp_path / "new").exists()  # ... and not created by the check


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_store_in_a_read_only_folder_is_refused(tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(
        StorageError, match=r"folder cannot be created, .*/ro is not writable \(Permission denied\)"
    ):
        storage_check.check_store(str(ro / "store"))


def test_os_errors_in_charlm_words(tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StorageError) as e:
        storage.write_text_atomic(str(afile / "datasets" / "m.json"), "{}")
    assert str(e.value) == f"{afile}/datasets/m.json: write failed (Not a directory: {afile}/datasets)"


# -- S3 ------------------------------------------------------------------------------------------------------
def test_a_healthy_store_check_leaves_nothing(own_s3: S3Server) -> None:
    bucket = _bucket(own_s3, "healthy")
    assert storage_check.check_store(bucket + "/store") == bucket + "/store"
    assert _keys(own_s3, bucket) == []  # the probe was deleted
    with pytest.raises(StorageError, match=r"^s3://nobucket/store: the store's bucket or container does not"):
        storage_check.check_store("s3://nobucket/store")


@pytest.mark.slow
def test_unreachable_store_fails_fast_and_publishes_nothing(
    own_s3: S3Server, tmp_path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = _bucket(own_s3, "down-store")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("some text\n" * 20)
    _no_reading(monkeypatch)
    own_s3.stop()
    line, took = _cli_error(capsys, ["ingest", str(tmp_path / "c"), "--store", bucket + "/store"])
    own_s3.start()
    m = re.match(
        rf"^charlm: error: {bucket}/store: write failed, storage {UNREACHABLE.format(port=own_s3.port)}", line
    )
    assert m, line
    assert int(m[1]) > 1 and took <= 15  # retried, within the budget
    assert _keys(own_s3, bucket) == []  # nothing published, no probe left


@pytest.mark.slow
def test_unreachable_source_fails_fast(own_s3: S3Server, tmp_path, capsys) -> None:
    bucket = _bucket(own_s3, "down-source")
    store = tmp_path / "store"
    own_s3.stop()
    line, took = _cli_error(capsys, ["ingest", bucket + "/corpus/", "--store", str(store)])
    m = re.match(
        rf"^charlm: error: {bucket}/corpus/: stat failed, storage {UNREACHABLE.format(port=own_s3.port)}",
        line,
    )
    assert m, line
    assert int(m[1]) > 1 and took <= 15
    assert not store.exists()  # nothing published


def _ingest_through_a_blip(server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch, down_s: float):
    """Ingest s3 -> s3, with the server stopped while the second object is encoded and started
    again down_s seconds later; returns (result or error, seconds the server was down)."""
    real = ingest.encode.encode_object
    blip: dict[str, float] = {}

    def restart() -> None:
        time.sleep(down_s)
        server.start()
        blip["up"] = time.monotonic()

    def encode(obj, *a, **k):
        if obj["url"].endswith("1.txt") and not blip:
            server.stop()
            blip["down"] = time.monotonic()
            threading.Thread(target=restart, daemon=True).start()
        return real(obj, *a, **k)

    monkeypatch.setattr(ingest.encode, "encode_object", encode)
    try:
        out = ingest.ingest([bucket + "/c"], bucket + "/store", Policies())
    except StorageError as e:
        out = e
    while "up" not in blip:
        time.sleep(0.05)
    return out, blip["up"] - blip["down"]


@pytest.mark.slow
def test_a_blip_shorter_than_the_budget_is_ridden_out(own_s3: S3Server, monkeypatch) -> None:
    from charlm import datasets

    bucket = _bucket(own_s3, "blip")
    for i in range(3):
        storage.write_text_atomic(f"{bucket}/c/{i}.txt", f"object {i}\n" * 10)
    monkeypatch.setenv(BUDGET_ENV, "4")
    storage.reset()
    result, down = _ingest_through_a_blip(own_s3, bucket, monkeypatch, 1.0)
    assert not isinstance(result, Exception), result
    assert down >= 1.0 and datasets.open_dataset(result["id"], bucket + "/store") is not None

    # the same blip against a budget shorter than it: the read fails, nothing is published
    storage.delete(bucket + "/store", recursive=True)
    monkeypatch.setenv(BUDGET_ENV, "0.3")
    storage.reset()
    error, _ = _ingest_through_a_blip(own_s3, bucket, monkeypatch, 1.5)
    assert isinstance(error, StorageUnreachableError), error
    # (the small objects were fetched ahead: what meets the outage is the dataset's upload)
    assert re.match(rf"^{bucket}/\S+: \w+ failed, storage unreachable at {own_s3.endpoint} ", str(error)), (
        error
    )
    assert datasets.list_datasets(bucket + "/store") == []


@pytest.mark.slow
def test_a_server_that_never_answers_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # connections complete in the kernel's backlog; nothing ever answers
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hung.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
        monkeypatch.setenv(BUDGET_ENV, "2")  # read timeout: max(5 s, budget)
        storage.reset()
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"^s3://b/k: read failed, .*Read timeout.*; 1 try in"):
            storage.read_bytes("s3://b/k")
        assert time.monotonic() - start < 8  # one try of 5 s: a second would not end within the budget
    finally:
        hung.close()
        storage.reset()
