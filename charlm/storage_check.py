"""Checks of the store and the sources before any work starts, called where a command or a flow
begins (the edge): a store that cannot take writes, or a source endpoint that does not answer,
is reported in one line within the storage retry budget ($CHARLM_STORAGE_RETRY_S), before a
corpus is read or a temporary Prefect server is started.

- A local store (or --out folder) must be a folder, or creatable as one, and writable: checked on
  the path and its nearest existing parent; nothing is created.
- A remote store takes a probe: an empty object written under a temporary hidden key (listings
  leave out names starting with '.') and deleted at once.
- A remote source gets one stat per bucket, or per local-free URL otherwise: a missing object is
  fine here (the listing reports it); an endpoint that does not answer is not.

A check that passed is not repeated in the same process for a minute (the CLI and the flow it
starts both check).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import Iterable

from charlm import storage
from charlm.storage import StorageError

_RECHECK_AFTER_S = 60.0
_passed: dict[tuple[str, str], float] = {}


def _recently_passed(kind: str, url: str) -> bool:
    t = _passed.get((kind, url))
    return t is not None and time.monotonic() - t < _RECHECK_AFTER_S


def check_local_folder(path: str, what: str) -> None:
    """A local folder that is one, or can be made one, and is writable; `what` names it in the
    error (e.g. 'the store', '--out'). Raises StorageError '<path>: <problem> (<errno text>)'."""
    path = os.path.abspath(os.path.expanduser(path))
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        if probe == path:
            raise StorageError(f"{path}: {what} is a file, not a folder ({os.strerror(errno.ENOTDIR)})")
        raise StorageError(
            f"{path}: cannot create {what} folder, {probe} is a file ({os.strerror(errno.ENOTDIR)})"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f", {probe} is not writable"
        verb = "is not writable" if probe == path else "cannot be created"
        raise StorageError(f"{path}: {what} folder {verb}{where} ({os.strerror(errno.EACCES)})")


def check_store(url: str | None = None) -> str:
    """The store root (argument, else $CHARLM_STORE, else ~/.charlm/store), once it is known to
    take writes. Raises StorageError naming the store and the problem (an unreachable endpoint:
    StorageUnreachableError, within the retry budget)."""
    root = storage.store_root(url)
    if _recently_passed("store", root):
        return root
    lp = storage.local_path(root)
    if lp is not None:
        check_local_folder(lp, "the store")
    else:
        probe = storage.join(root, f".charlm-probe-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            storage.write_bytes_atomic(probe, b"")
        except storage.ObjectNotFoundError as e:
            raise StorageError(f"{root}: the store's bucket or container does not exist ({e})") from e
        except StorageError as e:
            raise type(e)(str(e).replace(probe, root, 1)) from e
        with contextlib.suppress(StorageError):  # a store may take writes and refuse deletes
            storage.delete(probe)
    _passed[("store", root)] = time.monotonic()
    return root


def _reach_url(source: str) -> str:
    """Where to stat a source: its bucket for S3-like URLs, else the part before any glob."""
    proto = storage.protocol(source)
    rest = source.split("://", 1)[1] if "://" in source else source
    if proto in ("s3", "s3a", "gs", "gcs"):
        return f"{source.split('://', 1)[0]}://{rest.split('/', 1)[0]}"
    if storage.has_glob(rest):
        head = rest[: min(rest.index(c) for c in "*?[" if c in rest)]
        rest = head.rsplit("/", 1)[0] if "/" in head else head
        return f"{source.split('://', 1)[0]}://{rest}"
    return source


def check_sources(sources: Iterable[str]) -> None:
    """Each remote source's endpoint answers: one stat per bucket (local paths are not checked:
    their listing is immediate). Raises StorageError naming the source, as the listing would."""
    for source in sources:
        if storage.is_local(source) or "::" in source:
            continue
        target = _reach_url(source)
        if _recently_passed("source", target):
            continue
        try:
            storage.stat_reachable(target)
        except StorageError as e:
            raise type(e)(str(e).replace(target, source, 1)) from e
        _passed[("source", target)] = time.monotonic()


def check_ingest(sources: Iterable[str], store: str | None) -> str:
    """Before an ingest reads anything: the store takes writes and the sources answer. Returns
    the store root."""
    root = check_store(store)
    check_sources(sources)
    return root
