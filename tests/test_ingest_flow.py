"""The Prefect flow `ingest-corpus` and the CLI commands, against a temporary Prefect server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import pytest

pytest.importorskip("prefect")

from charlm import cli_datasets, datasets, ingest, storage
from charlm.ingest import InvalidUTF8Error
from charlm.storage import TransientStorageError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def flows_ingest(monkeypatch: pytest.MonkeyPatch):
    """flows.ingest with retry delays of 0.1 s instead of seconds."""
    import flows.ingest as fi

    for name in ("list_sources", "scan_objects", "encode_and_publish", "summarize"):
        monkeypatch.setattr(fi, name, getattr(fi, name).with_options(retry_delay_seconds=0.1))
    return fi


@pytest.fixture
def count_scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = ingest.scan_object

    def counting(obj, *a, **k):
        calls.append(obj.url if hasattr(obj, "url") else obj["url"])
        return real(obj, *a, **k)

    monkeypatch.setattr(ingest.scan, "scan_object", counting)
    return calls


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> str:
        async with get_client() as client:
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
            return arts[0].data if arts else ""

    return asyncio.run(read())


def test_flow_publishes_caches_and_reports(
    s3_bucket, put_objects, tmp_store, flows_ingest, count_scans
) -> None:
    put_objects(
        s3_bucket + "/c", {"a.txt": "\ufeffhello wörld\r\n".encode() * 50, "b.txt": b"second\n", "e.txt": b""}
    )
    r = flows_ingest.ingest_corpus([s3_bucket + "/c"], store=tmp_store, name="flow")
    assert not r["reused"] and r["objects"] == 3 and r["counts"]["crlf_to_lf"] == 50
    assert r["warnings"] == [f"{s3_bucket}/c/e.txt: empty object skipped"]
    ds = datasets.open_dataset(r["id"], tmp_store)
    assert ds is not None and ds.name == "flow" and "\r" not in ds.vocab.chars
    assert len(count_scans) == 3

    md = _artifact(f"dataset-{r['id'][:16]}")
    assert r["id"] in md and f"{s3_bucket}/c/a.txt" in md and f"vocab {len(ds.vocab)}" in md
    assert "top characters" in md and "CRLF->LF 50" in md

    # unchanged corpus: the scans come from the cache (nothing read) and nothing is rewritten
    again = flows_ingest.ingest_corpus([s3_bucket + "/c"], store=tmp_store)
    assert again["id"] == r["id"] and again["reused"] and len(count_scans) == 3

    # a changed object: its batch is scanned again, a new dataset is published
    put_objects(s3_bucket + "/c", {"b.txt": b"second, changed\n"})
    changed = flows_ingest.ingest_corpus([s3_bucket + "/c"], store=tmp_store)
    assert changed["id"] != r["id"] and not changed["reused"] and len(count_scans) == 6


def test_flow_rescans_when_a_cached_scan_is_stale(tmp_path, tmp_store, flows_ingest, count_scans) -> None:
    src = tmp_path / "c"
    src.mkdir()
    f = src / "a.txt"
    f.write_bytes(b"original text\n" * 10)
    first = flows_ingest.ingest_corpus([str(src)], store=tmp_store)
    st = os.stat(f)
    f.write_bytes(b"modified text\n" * 10)  # same size ...
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and same mtime: the cache key cannot tell
    # Into another store (where the stale id is not published yet): encoding finds that the text
    # does not match the cached digest, and the flow scans again without the cache.
    other = str(tmp_path / "store2")
    second = flows_ingest.ingest_corpus([str(src)], store=other)
    assert second["id"] != first["id"] and not second["reused"]
    ds = datasets.open_dataset(second["id"], other)
    assert ds.vocab.decode(ds.splits["train"]).startswith("modified")
    assert len(count_scans) == 2  # the stale cached scan was replaced by a fresh one


def test_flow_policy_errors_fail_without_retries(tmp_path, tmp_store, flows_ingest, monkeypatch) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.txt").write_bytes(b"ok\xffno")
    calls = []
    real = ingest.scan_objects
    monkeypatch.setattr(ingest, "scan_objects", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(InvalidUTF8Error, match=r"bad\.txt: invalid UTF-8 at byte offset 2"):
        flows_ingest.ingest_corpus([str(tmp_path / "c")], store=tmp_store)
    assert len(calls) == 1  # not retried


def test_flow_storage_outage_fails_fast_and_cleanly(
    s3_server, s3_bucket, put_objects, tmp_store, flows_ingest, monkeypatch
) -> None:
    put_objects(s3_bucket + "/c", {f"{i}.txt": f"object {i}\n".encode() for i in range(3)})
    store = s3_bucket + "/store"
    attempts = []
    real_publish, real_encode = ingest.publish, ingest.encode_object

    def publish(*a, **k):
        attempts.append(1)
        return real_publish(*a, **k)

    def encode(obj, *a, **k):
        if obj["url"].endswith("1.txt") and len(attempts) == 1:
            s3_server.stop()  # the store goes away in the middle of encoding
        return real_encode(obj, *a, **k)

    monkeypatch.setattr(ingest, "publish", publish)
    monkeypatch.setattr(ingest.encode, "encode_object", encode)
    t0 = time.monotonic()
    try:
        with pytest.raises(
            TransientStorageError, match=rf"^{s3_bucket}/\S+: \w+ failed, storage unreachable"
        ):
            flows_ingest.ingest_corpus([s3_bucket + "/c"], store=store)
        elapsed = time.monotonic() - t0
    finally:
        s3_server.start()
        storage.reset()
    # the storage layer spent its retry budget; the task is not retried on top of it
    assert len(attempts) == 1 and elapsed <= 15, (attempts, elapsed)
    assert datasets.list_datasets(store) == []  # nothing published ...
    folders = storage.ls(storage.join(store, "datasets"))
    assert folders and not storage.exists(
        storage.join(folders[0], "manifest.json")
    )  # ... half-written is absent
    with pytest.raises(datasets.DatasetNotFoundError):
        datasets.open_dataset(storage.basename(folders[0]), store)
    monkeypatch.setattr(ingest.encode, "encode_object", real_encode)
    ok = flows_ingest.ingest_corpus([s3_bucket + "/c"], store=store)  # when the store is back: fine
    assert storage.basename(folders[0]) == ok["id"] and datasets.open_dataset(ok["id"], store) is not None


# -- CLI ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="charlm")
    cli_datasets.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> tuple[dict, str]:
    args = _parser().parse_args(argv)
    result = args.func(args)
    json.dumps(result)  # JSON-able
    return result, args.render(result)


def test_cli_ingest_list_show(tmp_path, tmp_store) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"one\r\ntwo\r\n" * 20)
    src = str(tmp_path / "c")
    r, text = _run(["ingest", src, "--store", tmp_store, "--name", "cli", "--newlines", "keep", "--json"])
    assert r["id"] and "(published)" in text and r["counts"]["crlf_to_lf"] == 0
    ds = datasets.open_dataset(r["id"], tmp_store)
    assert "\r" in ds.vocab.chars and ds.manifest["policies"]["newlines"] == "keep"
    r2, text2 = _run(["ingest", src, "--store", tmp_store, "--newlines", "keep"])
    assert r2["id"] == r["id"] and "unchanged, already published" in text2

    listed, table = _run(["datasets", "list", "--store", tmp_store, "--json"])
    assert [d["id"] for d in listed["datasets"]] == [r["id"]] and r["id"][:12] in table and "cli" in table
    shown, _ = _run(["datasets", "show", r["id"][:8], "--store", tmp_store])
    assert shown["id"] == r["id"] and shown["policies"]["newlines"] == "keep"
    with pytest.raises(datasets.DatasetNotFoundError):
        _run(["datasets", "show", "feedbeef", "--store", tmp_store])
    empty, msg = _run(["datasets", "list", "--store", str(tmp_path / "nothing")])
    assert empty["datasets"] == [] and msg.startswith("no datasets in")
