"""Storage adapter: read, list and write by URL. With charlm.storage_retry (its failure policy),
the only module that imports fsspec/s3fs.

URLs are anything fsspec understands: ``s3://bucket/key``, ``file:///path`` or a plain path,
``memory://x``, ``gs://...`` and so on. Credentials and endpoints come from the environment only
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...), so
nothing that is logged, pickled or passed between processes ever carries a secret.

Filesystem objects are created lazily per process (s3fs is not fork-safe) and never cache
listings: a corpus prefix is re-listed every time, so a changed object is always seen.

Errors are translated into :class:`StorageError` subclasses with one line that names the URL:
:class:`ObjectNotFoundError` and :class:`TransientStorageError` (connection refused or reset,
timeouts, throttling, 5xx: worth retrying; the Prefect flows retry only these), of which
:class:`StorageUnreachableError` names the endpoint that could not be reached. How S3 requests
time out and retry, within one budget ($CHARLM_STORAGE_RETRY_S), is in charlm.storage_retry;
checks of a store before work starts are in charlm.storage_check.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol

# re-exported: failures are classified, retried and reported in charlm.storage_retry
from charlm.storage_retry import (  # noqa: F401
    BUDGET_ENV,
    ObjectNotFoundError,
    RetryBudget,
    StorageError,
    StorageUnreachableError,
    TransientStorageError,
    install_s3_retry_policy,
    is_transient,
    translate_error,
)
from charlm.storage_retry import errors as _errors

DEFAULT_STORE = "~/.charlm/store"
STORE_ENV = "CHARLM_STORE"

# Object stores where a PUT / completed multipart upload is atomic: the key appears whole or not
# at all, so a writer can target the final key directly and abort on failure.
_ATOMIC_PUT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
_LOCAL = frozenset({"file", "local"})
_GLOB_CHARS = frozenset("*?[")
MIN_WRITE_BLOCK = 8 << 20  # multipart part size (S3 needs >= 5 MiB); bounds writer memory


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its URL, size in bytes and version token (ETag, else mtime)."""

    url: str
    size: int
    version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObjectInfo:
        return cls(str(d["url"]), int(d["size"]), str(d["version"]))


# -- URLs -----------------------------------------------------------------------------------------
def protocol(url: str) -> str:
    """'s3' for s3://b/k, 'file' for a plain path or file:// URL (last link of a chained URL)."""
    proto, _ = split_protocol(url.split("::")[0])
    return (proto or "file").lower()


def is_local(url: str) -> bool:
    return "::" not in url and protocol(url) in _LOCAL


def local_path(url: str) -> str | None:
    """The filesystem path of a local URL, else None."""
    if not is_local(url):
        return None
    _, path = split_protocol(url)
    return os.path.abspath(os.path.expanduser(path))


def normalize_url(url: str) -> str:
    """Local URLs become absolute plain paths; others lose a trailing slash."""
    lp = local_path(url)
    if lp is not None:
        return lp
    return url.rstrip("/") if not url.endswith("://") else url


def store_root(url: str | None = None) -> str:
    """The store root: the argument, else $CHARLM_STORE, else ~/.charlm/store."""
    return normalize_url(url or os.environ.get(STORE_ENV) or DEFAULT_STORE)


@dataclass(frozen=True)
class Store:
    """A store root and its folder layout. The only code that joins the layout's folder names:
    datasets/<id>/, runs/<run name>/, samples/<job>/ and MLflow's artifacts when no server
    decides where they go."""

    root: str

    @classmethod
    def at(cls, url: str | None = None) -> Store:
        """The store at `url`, else $CHARLM_STORE, else ~/.charlm/store."""
        return cls(store_root(url))

    def datasets(self, *parts: str) -> str:
        return join(self.root, "datasets", *parts)

    def runs(self, *parts: str) -> str:
        return join(self.root, "runs", *parts)

    def samples(self, *parts: str) -> str:
        return join(self.root, "samples", *parts)

    def mlflow_artifacts(self) -> str:
        return join(self.root, "mlflow-artifacts")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/' (works for plain paths and every protocol)."""
    out = url.rstrip("/") if not url.endswith("://") else url
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}" if not out.endswith("://") else out + p
    return out


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def has_glob(url: str) -> bool:
    return any(c in _GLOB_CHARS for c in url)


# -- filesystems ------------------------------------------------------------------------------------
_fs_cache: dict[tuple[int, str], Any] = {}


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL; created lazily, once per process.

    For adapters that need the raw filesystem (e.g. wrapping it for pyarrow/Ray). Options come from
    the environment only; the object holds no secret passed by us.
    """
    proto = protocol(url)
    if "::" in url:  # chained URL (simplecache::s3://...): let fsspec build the chain each time
        return fsspec.core.url_to_fs(url)
    key = (os.getpid(), proto)
    fs = _fs_cache.get(key)
    if fs is None:
        if any(k[0] != key[0] for k in _fs_cache):  # forked: drop the parent's instances
            _fs_cache.clear()
        options: dict[str, Any] = {}
        budget = None
        if proto not in _LOCAL:
            options["use_listings_cache"] = False
        if proto in ("s3", "s3a"):
            options["skip_instance_cache"] = True
            budget = install_s3_retry_policy()  # timeouts and one retry budget
            options["config_kwargs"] = budget.botocore_config()
        fs = fsspec.filesystem(proto, **options)
        if budget is not None:
            fs.retries = budget.max_tries  # s3fs's own loop: the only one
        _fs_cache[key] = fs
    path = fs._strip_protocol(url)
    if proto in _LOCAL:
        path = os.path.abspath(os.path.expanduser(path))
    return fs, path


def reset() -> None:
    """Forget this process's filesystem objects (after changing AWS_* or endpoint variables)."""
    _fs_cache.clear()


def _url(fs: Any, path: str, like: str) -> str:
    if is_local(like):
        return path
    return fs.unstrip_protocol(path)


# -- listing ------------------------------------------------------------------------------------------
def _version(info: dict[str, Any]) -> str:
    for k in ("ETag", "etag", "md5Hash", "md5", "crc32c"):
        v = info.get(k)
        if v:
            return str(v).strip('"')
    for k in ("mtime", "LastModified", "last_modified", "modified", "updated", "created"):
        v = info.get(k)
        if v is None:
            continue
        if isinstance(v, datetime):
            return v.isoformat()
        if isinstance(v, float | int):
            return f"mtime:{v!r}"
        return str(v)
    return ""


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/") if part)


def info(url: str) -> ObjectInfo:
    """Size and version of one object."""
    fs, path = filesystem(url)
    with _errors(url, "stat"):
        d = fs.info(path)
    if d.get("type") == "directory":
        raise StorageError(f"{url}: is a folder/prefix, not an object")
    return ObjectInfo(_url(fs, path, url), int(d.get("size") or 0), _version(d))


def list_objects(source: str, *, include_hidden: bool = False) -> list[ObjectInfo]:
    """Objects named by source: one object, a prefix/folder (recursive) or a glob.

    Sorted by URL; every page of the listing is read. Below a prefix or glob, names with a
    component starting with '.' (temp files, .DS_Store) are left out unless include_hidden.
    Raises ObjectNotFoundError when nothing matches.
    """
    fs, path = filesystem(source)
    with _errors(source, "list"):
        if has_glob(path) and not fs.exists(path):  # a literal name with [ or * is not a glob
            found = fs.glob(path, detail=True)
            prefix = path.split("*")[0].split("?")[0].split("[")[0]
            prefix = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        elif fs.isfile(path):
            d = fs.info(path)
            return [ObjectInfo(_url(fs, path, source), int(d.get("size") or 0), _version(d))]
        elif fs.isdir(path):
            found = fs.find(path, detail=True, withdirs=False)
            prefix = path
        else:
            raise ObjectNotFoundError(f"{source}: no such object, prefix or folder")
    out = []
    for p, d in found.items():
        if d.get("type", "file") != "file" or p.endswith("/"):
            continue
        rel = p[len(prefix) :] if prefix and p.startswith(prefix) else p
        if not include_hidden and _is_hidden(rel):
            continue
        out.append(ObjectInfo(_url(fs, p, source), int(d.get("size") or 0), _version(d)))
    if not out:
        raise ObjectNotFoundError(f"{source}: no objects match")
    out.sort(key=lambda o: o.url)
    return out


def ls(url: str) -> list[str]:
    """URLs of the immediate children of a folder/prefix ([] if it does not exist)."""
    fs, path = filesystem(url)
    with _errors(url, "list"):
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    return sorted(_url(fs, n.rstrip("/"), url) for n in names if n.rstrip("/") != path.rstrip("/"))


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with _errors(url, "stat"):
        return bool(fs.exists(path))


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    with _errors(url, "stat"):
        return bool(fs.isdir(path))


def delete(url: str, recursive: bool = False) -> None:
    """Remove an object (or everything below a prefix with recursive); missing is not an error."""
    fs, path = filesystem(url)
    with _errors(url, "delete"), contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)


def stat_reachable(url: str) -> None:
    """One stat of url, to see that the storage behind it answers. Only a transient failure
    (unreachable, timing out, 5xx) is raised: an answer such as 'not found' or 'forbidden' shows
    that the endpoint is there (the listing that follows reports it)."""
    fs, path = filesystem(url)
    try:
        with _errors(url, "stat"):
            fs.info(path)
    except TransientStorageError:
        raise
    except StorageError:
        pass


def makedirs(url: str) -> None:
    """Create a local folder (and parents); a no-op on object stores."""
    lp = local_path(url)
    if lp is not None:
        with _errors(url, "mkdir"):
            os.makedirs(lp, exist_ok=True)


# -- reading ------------------------------------------------------------------------------------------
class _Reader:
    """A binary file for reading whose errors are StorageErrors naming the URL."""

    def __init__(self, f: IO[bytes], url: str) -> None:
        self._f = f
        self.url = url

    def read(self, n: int = -1) -> bytes:
        with _errors(self.url, "read"):
            return self._f.read(n)

    def readinto(self, b: Any) -> int:
        with _errors(self.url, "read"):
            return self._f.readinto(b)  # type: ignore[attr-defined]

    def seek(self, pos: int, whence: int = 0) -> int:
        with _errors(self.url, "seek"):
            return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _StreamReader:
    """An object read with a single streaming GET (s3fs's open_async), for sequential reads.

    Ranged GETs per read() would cost a request each (and some servers re-read the object for
    every range); one GET whose body is consumed as it arrives keeps memory at one read's size.
    """

    def __init__(self, fs: Any, path: str, url: str) -> None:
        from fsspec.asyn import sync

        self.url = url
        self._loop = fs.loop
        self._sync = sync
        self._eof = False
        self._f = sync(self._loop, fs.open_async, path, "rb")

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        got = 0
        with _errors(self.url, "read"):
            while (n < 0 or got < n) and not self._eof:
                b = self._sync(self._loop, self._f.read, -1 if n < 0 else n - got)
                if not b:
                    self._eof = True
                    break
                parts.append(b)
                got += len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._sync(self._loop, self._f.close)

    def __enter__(self) -> _StreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_read(url: str, block_size: int = 4 << 20) -> _Reader | _StreamReader:
    """Open an object for sequential streaming reads (never a whole-object read into memory).

    Local files: a plain file. Filesystems with streaming GETs (S3): one GET read as it arrives.
    Others: fsspec's file with reads of about block_size.
    """
    lp = local_path(url)
    with _errors(url, "open"):
        if lp is not None:
            return _Reader(open(lp, "rb"), url)
        fs, path = filesystem(url)
        if protocol(url) in ("s3", "s3a") and hasattr(fs, "open_async"):
            return _StreamReader(fs, path, url)
        return _Reader(fs.open(path, "rb", block_size=block_size), url)


def read_bytes(url: str) -> bytes:
    """A whole (small) object."""
    fs, path = filesystem(url)
    with _errors(url, "read"):
        return bytes(fs.cat_file(path))


def read_many(urls: list[str]) -> list[bytes]:
    """Several whole (small) objects; fetched concurrently where the backend is async (S3...)."""
    if not urls:
        return []
    fs, _ = filesystem(urls[0])
    same = all(protocol(u) == protocol(urls[0]) and "::" not in u for u in urls)
    if not (same and getattr(fs, "async_impl", False)) or len(urls) == 1:
        return [read_bytes(u) for u in urls]
    paths = [filesystem(u)[1] for u in urls]
    with _errors(urls[0], "read"):
        got = fs.cat(paths, on_error="return")
    out = []
    for u, p in zip(urls, paths, strict=True):
        v = got.get(p) if isinstance(got, dict) else got
        if isinstance(v, BaseException):
            raise translate_error(v, u, "read") from v
        if v is None:
            raise ObjectNotFoundError(f"{u}: read failed, not found")
        out.append(bytes(v))
    return out


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


# -- writing ------------------------------------------------------------------------------------------
def _temp_name(path: str) -> str:
    head, _, name = path.rpartition("/")
    tmp = f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    return f"{head}/{tmp}" if head else tmp


@contextlib.contextmanager
def atomic_writer(url: str, block_size: int = MIN_WRITE_BLOCK) -> Iterator[IO[bytes]]:
    """A binary file that appears at url whole, or not at all if the block raises.

    Local: a temp file next to the target, fsync'ed, then os.replace. Object stores with atomic
    PUT (S3, GCS, Azure): the final key directly; a failed write aborts the multipart upload, so no
    partial object ever becomes visible. Other filesystems: a temp key, then a rename.
    Memory stays bounded by block_size whatever is written.
    """
    lp = local_path(url)
    if lp is not None:
        with _errors(url, "write"):
            os.makedirs(os.path.dirname(lp) or ".", exist_ok=True)
            tmp = _temp_name(lp)
            f = open(tmp, "wb")  # noqa: SIM115 - closed below
        try:
            yield f
            with _errors(url, "write"):
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(tmp, lp)
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return

    fs, path = filesystem(url)
    if protocol(url) in _ATOMIC_PUT:
        with _errors(url, "write"):
            f = fs.open(path, "wb", block_size=max(block_size, MIN_WRITE_BLOCK))
        try:
            yield f
            with _errors(url, "write"):
                f.close()
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # aborts a multipart upload; nothing was PUT yet otherwise
            f.closed = True  # do not let close()/__del__ commit a partial object
            raise
        return

    tmp = _temp_name(path)
    with _errors(url, "write"):
        f = fs.open(tmp, "wb")
    try:
        yield f
        with _errors(url, "write"):
            f.close()
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def write_bytes_atomic(url: str, data: bytes) -> None:
    with atomic_writer(url) as f:
        f.write(data)


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))
