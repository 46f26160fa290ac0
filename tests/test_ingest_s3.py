"""Ingestion through the real S3 protocol (s3fs -> moto's server on 127.0.0.1), as a bucket would."""

from __future__ import annotations

import os

import numpy as np
import pytest

from charlm import datasets, ingest, storage
from charlm.ingest import BinaryObjectError, EmptyCorpusError, InvalidUTF8Error, Policies

EMOJI = "😀".encode()  # 4 bytes


@pytest.fixture
def streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stream every object with ranged GETs (no whole-object fetch of small objects)."""
    monkeypatch.setattr(ingest.text, "SMALL_OBJECT", 0)


def splits_text(ds: datasets.Dataset) -> str:
    return ds.vocab.decode(np.concatenate([ds.splits[k] for k in ("train", "val", "test")]))


@pytest.mark.slow
def test_prefix_larger_than_one_listing_page(s3_bucket: str, seed_s3, tmp_store: str) -> None:
    n = 1005  # S3 (and moto) return at most 1000 keys per listing page
    # every 50th object (and the last, on the second page) has text; the rest are empty, which
    # keeps the test quick: an object listed with size 0 is skipped without a GET
    texts = {i: f"{i};".encode() if i % 50 == 0 or i == n - 1 else b"" for i in range(n)}
    seed_s3(s3_bucket + "/corpus", {f"part-{i:05d}.txt": t for i, t in reversed(texts.items())})
    objs = storage.list_objects(s3_bucket + "/corpus/")
    assert len(objs) == n and objs[-1].url.endswith("part-01004.txt")
    r = ingest.ingest(s3_bucket + "/corpus/", tmp_store)
    assert r["objects"] == n and r["counts"]["objects_skipped_empty"] == n - 22
    ds = datasets.open_dataset(r["id"], tmp_store)
    assert splits_text(ds) == "".join(t.decode() for t in texts.values())  # all pages, key order


def test_four_byte_char_straddles_read_chunks(s3_bucket: str, put_objects, tmp_store: str, streamed) -> None:
    chunk = 64 << 10
    body = b"a" * (chunk - 2) + EMOJI + b"b" * (chunk - 1) + EMOJI + b"\r" + b"\nz" * 1000
    put_objects(s3_bucket, {"big.txt": body})
    r = ingest.ingest(s3_bucket + "/big.txt", tmp_store, chunk_size=chunk)
    ds = datasets.open_dataset(r["id"], tmp_store)
    want = body.decode().replace("\r\n", "\n")
    assert splits_text(ds) == want
    assert dict(zip(ds.vocab.chars, ds.vocab.counts, strict=True))["😀"] == 2
    assert r["counts"]["crlf_to_lf"] == 1 and r["counts"]["cr_to_lf"] == 0  # CR and LF in different chunks


def test_bom_crlf_lone_cr(s3_bucket: str, put_objects, tmp_store: str, streamed) -> None:
    put_objects(
        s3_bucket + "/c", {"a.txt": b"\xef\xbb\xbfone\r\ntwo\rthree\r", "b.txt": b"\xef\xbb\xbffour\n"}
    )
    r = ingest.ingest(s3_bucket + "/c", tmp_store, chunk_size=3)
    ds = datasets.open_dataset(r["id"], tmp_store)
    assert splits_text(ds) == "one\ntwo\nthree\nfour\n"
    assert "\ufeff" not in ds.vocab.chars and "\r" not in ds.vocab.chars
    assert (r["counts"]["bom_stripped"], r["counts"]["crlf_to_lf"], r["counts"]["cr_to_lf"]) == (2, 1, 2)
    kept = ingest.ingest(s3_bucket + "/c", tmp_store, Policies(newlines="keep"))
    assert splits_text(datasets.open_dataset(kept["id"], tmp_store)) == "one\r\ntwo\rthree\rfour\n"


def test_invalid_utf8_policies(s3_bucket: str, put_objects, tmp_store: str, streamed) -> None:
    put_objects(s3_bucket + "/c", {"a.txt": b"fine\n", "b.txt": b"caf\xc3\xa9 \xff\xfe ok \xe2\x82"})
    with pytest.raises(InvalidUTF8Error, match=rf"^{s3_bucket}/c/b\.txt: invalid UTF-8 at byte offset 6 "):
        ingest.ingest(s3_bucket + "/c", tmp_store, chunk_size=4)
    r = ingest.ingest(s3_bucket + "/c", tmp_store, Policies(invalid="replace"), chunk_size=4)
    assert r["counts"]["invalid_replaced"] == 3
    assert splits_text(datasets.open_dataset(r["id"], tmp_store)) == "fine\ncafé \ufffd\ufffd ok \ufffd"


def test_binary_and_empty_objects(s3_bucket: str, put_objects, tmp_store: str) -> None:
    put_objects(
        s3_bucket + "/c",
        {"a.txt": b"text\n", "e1.txt": b"", "e2.txt": b"", "z.gz": b"\x1f\x8b\x08\x00\x00\x00"},
    )
    with pytest.raises(BinaryObjectError, match=rf"^{s3_bucket}/c/z\.gz: binary-looking object"):
        ingest.ingest(s3_bucket + "/c", tmp_store, Policies(invalid="replace"))
    r = ingest.ingest(s3_bucket + "/c/*.txt", tmp_store)
    assert r["counts"]["objects_skipped_empty"] == 2
    assert r["warnings"] == [
        f"{s3_bucket}/c/e1.txt: empty object skipped",
        f"{s3_bucket}/c/e2.txt: empty object skipped",
    ]
    with pytest.raises(EmptyCorpusError, match="corpus is empty: 2 objects"):
        ingest.ingest(s3_bucket + "/c/e*", tmp_store)


def test_reingest_noop_and_changed_object(s3_bucket: str, put_objects, tmp_store: str) -> None:
    put_objects(s3_bucket + "/c", {"a.txt": b"alpha\n", "b.txt": b"beta\n"})
    first = ingest.ingest(s3_bucket + "/c", tmp_store)
    manifest = os.path.join(first["url"], "manifest.json")
    stamp = os.stat(manifest).st_mtime_ns
    again = ingest.ingest(s3_bucket + "/c", tmp_store)
    assert again["id"] == first["id"] and again["reused"] and os.stat(manifest).st_mtime_ns == stamp
    put_objects(s3_bucket + "/c", {"b.txt": b"beta!\n"})
    changed = ingest.ingest(s3_bucket + "/c", tmp_store)
    assert changed["id"] != first["id"] and not changed["reused"]
    assert splits_text(datasets.open_dataset(changed["id"], tmp_store)) == "alpha\nbeta!\n"


def test_same_result_from_s3_and_local_folder(s3_bucket: str, put_objects, tmp_path, tmp_store: str) -> None:
    files = {
        "x/1.txt": "\ufeffÜber\r\nstraße 😀\n".encode() * 300,
        "x/2.txt": b"plain ascii\r\n" * 5000,  # > SMALL_OBJECT? no: 65 KB; both paths below
        "y.txt": "日本語のテキスト\n".encode() * 100,
    }
    put_objects(s3_bucket + "/corpus", files)
    put_objects(str(tmp_path / "corpus"), files)
    a = ingest.ingest(s3_bucket + "/corpus", tmp_store)
    b = ingest.ingest(str(tmp_path / "corpus"), str(tmp_path / "store2"))
    assert a["id"] == b["id"] and a["chars"] == b["chars"]
    da, db = (
        datasets.open_dataset(a["id"], tmp_store),
        datasets.open_dataset(b["id"], str(tmp_path / "store2")),
    )
    assert da.vocab == db.vocab
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(da.splits[k], db.splits[k])


def test_store_on_s3(s3_bucket: str, put_objects, tmp_path) -> None:
    put_objects(str(tmp_path / "c"), {"a.txt": b"hello s3 store\n" * 10})
    store = s3_bucket + "/store"
    r = ingest.ingest(str(tmp_path / "c"), store, name="s3")
    assert r["url"] == f"{store}/datasets/{r['id']}"
    ds = datasets.open_dataset(r["id"][:8], store)
    assert ds is not None and splits_text(ds) == "hello s3 store\n" * 10
    assert [d["id"] for d in datasets.list_datasets(store)] == [r["id"]]
    assert ingest.ingest(str(tmp_path / "c"), store)["reused"]


@pytest.mark.slow
def test_worker_processes_read_s3(s3_bucket: str, put_objects, tmp_store: str, monkeypatch) -> None:
    files = {f"p{i}.txt": (f"part {i} — ü\n" * (3000 + i)).encode() for i in range(4)}
    put_objects(s3_bucket + "/c", files)
    one = ingest.ingest(s3_bucket + "/c", tmp_store)
    monkeypatch.setattr(ingest.pool, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(ingest.text, "SMALL_OBJECT", 0)
    monkeypatch.setenv("CHARLM_INGEST_PROCESSES", "2")
    p = Policies()
    scans = ingest.scan_objects(ingest.list_sources([s3_bucket + "/c"]), p)  # in 2 worker processes
    assert ingest.dataset_id(p, scans) == one["id"]
    assert [s["url"] for s in scans] == [f"{s3_bucket}/c/p{i}.txt" for i in range(4)]
