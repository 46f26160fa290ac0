"""Storage adapter: URLs, listing, atomic writes, error translation; local, memory:// and S3."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from charlm import storage
from charlm.storage import ObjectInfo, ObjectNotFoundError, StorageError, TransientStorageError


def test_store_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CHARLM_STORE", "s3://team/store/")
    assert storage.store_root("memory://x/") == "memory://x"
    assert storage.store_root(None) == "s3://team/store"
    monkeypatch.delenv("CHARLM_STORE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.store_root() == os.path.join(str(tmp_path), ".charlm", "store")
    assert storage.store_root("rel/dir") == os.path.abspath("rel/dir")
    assert storage.store_root("file:///tmp/x/") == "/tmp/x"


def test_the_store_owns_its_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    store = storage.Store.at("s3://team/store/")
    assert store.root == "s3://team/store"
    assert store.datasets("ab12", "manifest.json") == "s3://team/store/datasets/ab12/manifest.json"
    assert (
        store.runs() == "s3://team/store/runs" and store.samples("gen-1") == "s3://team/store/samples/gen-1"
    )
    assert store.mlflow_artifacts() == "s3://team/store/mlflow-artifacts"
    monkeypatch.setenv("CHARLM_STORE", "/srv/charlm/")
    assert storage.Store.at().datasets() == "/srv/charlm/datasets"
    from charlm import datasets, runs

    assert runs.runs_root() == "/srv/charlm/runs" and datasets.datasets_root(None) == "/srv/charlm/datasets"


def test_join_and_protocols() -> None:
    assert (
        storage.join("s3://b/p/", "datasets", "/id/", "manifest.json") == "s3://b/p/datasets/id/manifest.json"
    )
    assert storage.join("/tmp/s", "a") == "/tmp/s/a"
    assert storage.join("memory://", "a", "b") == "memory://a/b"
    assert storage.protocol("s3://b/k") == "s3"
    assert storage.protocol("/x") == "file"
    assert storage.is_local("file:///x") and storage.is_local("x/y") and not storage.is_local("s3://b")
    assert storage.local_path("s3://b/k") is None
    assert storage.has_glob("s3://b/*.txt") and not storage.has_glob("s3://b/a.txt")


def test_object_info_round_trip() -> None:
    o = ObjectInfo("s3://b/k", 12, "abc")
    assert ObjectInfo.from_dict(o.to_dict()) == o


def _tree(root) -> None:
    for rel, data in {
        "b.txt": b"bb",
        "a.txt": b"a",
        "sub/c.txt": b"ccc",
        "sub/.hidden": b"x",
        ".DS_Store": b"\x00\x01",
        "z.md": b"zz",
    }.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)


def test_list_objects_local(tmp_path) -> None:
    root = str(tmp_path / "corpus")
    _tree(root)
    objs = storage.list_objects(root)
    assert [os.path.relpath(o.url, root) for o in objs] == ["a.txt", "b.txt", "sub/c.txt", "z.md"]
    assert [o.size for o in objs] == [1, 2, 3, 2]
    assert all(o.version for o in objs)
    assert [os.path.basename(o.url) for o in storage.list_objects(root + "/*.txt")] == ["a.txt", "b.txt"]
    assert [os.path.basename(o.url) for o in storage.list_objects(root + "/**/*.txt")] == [
        "a.txt",
        "b.txt",
        "c.txt",
    ]
    one = storage.list_objects(root + "/sub/.hidden")  # named explicitly: kept
    assert len(one) == 1 and one[0].size == 1
    with_hidden = storage.list_objects(root, include_hidden=True)
    assert len(with_hidden) == 6
    with pytest.raises(ObjectNotFoundError, match="no such object"):
        storage.list_objects(root + "/missing")
    with pytest.raises(ObjectNotFoundError, match="no objects match"):
        storage.list_objects(root + "/*.csv")


def test_atomic_writer_local(tmp_path) -> None:
    url = str(tmp_path / "d" / "f.bin")
    with storage.atomic_writer(url) as f:
        f.write(b"hello")
    assert storage.read_bytes(url) == b"hello"
    with pytest.raises(RuntimeError), storage.atomic_writer(url) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert storage.read_bytes(url) == b"hello"  # old content kept, no partial
    assert os.listdir(tmp_path / "d") == ["f.bin"]  # temp file removed


def test_memory_filesystem_round_trip() -> None:
    root = "memory://charlm-test-mem"
    storage.write_bytes_atomic(storage.join(root, "a", "x.txt"), b"xyz")
    assert storage.read_bytes(storage.join(root, "a", "x.txt")) == b"xyz"
    assert storage.exists(storage.join(root, "a", "x.txt"))
    with pytest.raises(RuntimeError), storage.atomic_writer(storage.join(root, "a", "y.txt")) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert [storage.basename(u) for u in storage.ls(storage.join(root, "a"))] == ["x.txt"]
    objs = storage.list_objects(root)
    assert [o.size for o in objs] == [3]
    storage.delete(root, recursive=True)
    assert storage.ls(root) == []


def test_is_transient_classification() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    assert storage.is_transient(ConnectionRefusedError())
    assert storage.is_transient(TimeoutError())
    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    slow = ClientError(
        {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"
    )
    assert storage.is_transient(slow)
    denied = ClientError(
        {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Get"
    )
    assert not storage.is_transient(denied)
    assert not storage.is_transient(FileNotFoundError())
    assert not storage.is_transient(ValueError("bad policy"))
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as e:
            raise OSError("wrapped") from e
    except OSError as wrapped:
        assert storage.is_transient(wrapped)
    t = storage.translate_error(ConnectionRefusedError("refused"), "s3://b/k", "read")
    assert isinstance(t, TransientStorageError) and str(t).startswith("s3://b/k: read failed")


# -- S3 -----------------------------------------------------------------------------------------------
def test_s3_list_read_write(s3_bucket: str, put_objects) -> None:
    put_objects(s3_bucket + "/corpus", {"b.txt": b"bb", "a.txt": b"a", "sub/c.txt": b"ccc", "sub/.tmp": b"x"})
    objs = storage.list_objects(s3_bucket + "/corpus")
    assert [o.url for o in objs] == [f"{s3_bucket}/corpus/{k}" for k in ("a.txt", "b.txt", "sub/c.txt")]
    assert [o.size for o in objs] == [1, 2, 3]
    assert all(len(o.version) == 32 for o in objs)  # ETag (md5 hex) without quotes
    assert [o.url for o in storage.list_objects(s3_bucket + "/corpus/*.txt")] == [
        f"{s3_bucket}/corpus/a.txt",
        f"{s3_bucket}/corpus/b.txt",
    ]
    assert storage.list_objects(s3_bucket + "/corpus/b.txt")[0].size == 2
    assert storage.read_many([o.url for o in objs]) == [b"a", b"bb", b"ccc"]
    with storage.open_read(objs[2].url, block_size=2) as f:
        assert f.read(2) + f.read(2) + f.read(2) == b"ccc"
    with pytest.raises(ObjectNotFoundError, match=f"{s3_bucket}/corpus/nope"):
        storage.read_bytes(s3_bucket + "/corpus/nope")
    with pytest.raises(ObjectNotFoundError):
        storage.list_objects(s3_bucket + "/nothing-here/")


def test_s3_atomic_writer_never_publishes_partial(s3_bucket: str) -> None:
    import boto3

    url = s3_bucket + "/out/big.bin"
    big = os.urandom(1 << 20) * 9  # > one 8 MiB part: a multipart upload is under way when it fails
    with pytest.raises(RuntimeError), storage.atomic_writer(url) as f:
        f.write(big)
        raise RuntimeError("crash mid-write")
    assert not storage.exists(url)
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3")
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted
    with storage.atomic_writer(url) as f:
        f.write(big)
    assert storage.info(url).size == len(big)


def test_s3_server_down_is_transient(s3_server, s3_bucket: str) -> None:
    storage.write_bytes_atomic(s3_bucket + "/k", b"v")
    s3_server.stop()
    try:
        with pytest.raises(TransientStorageError, match=f"{s3_bucket}/k: read failed"):
            storage.read_bytes(s3_bucket + "/k")
        with pytest.raises(TransientStorageError):
            storage.list_objects(s3_bucket)
    finally:
        s3_server.start()
        storage.reset()
    assert storage.read_bytes(s3_bucket + "/k") == b"v"


def _child_lists(url: str) -> list[str]:
    return [o.url for o in storage.list_objects(url)]


def test_s3_after_fork(s3_bucket: str, put_objects) -> None:
    put_objects(s3_bucket, {"x.txt": b"x"})
    assert _child_lists(s3_bucket)  # parent has a filesystem object (and its event loop)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_child_lists, (s3_bucket,)) == [f"{s3_bucket}/x.txt"]


def test_errors_are_storage_errors(tmp_path) -> None:
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="is a folder"):
        storage.info(str(tmp_path))


def test_names_with_glob_characters_are_literal_when_they_exist(tmp_path) -> None:
    folder = tmp_path / "data[1]"
    folder.mkdir()
    (folder / "x.txt").write_bytes(b"x")
    assert [o.size for o in storage.list_objects(str(folder))] == [1]
    assert [o.size for o in storage.list_objects(str(folder / "x.txt"))] == [1]
