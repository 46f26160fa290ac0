"""Pass 1, the scan: per object (independent, cacheable), its characters counted and the sha256
of its normalized text; then the checks, vocabulary and dataset id over all scans."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from charlm import storage
from charlm.ingest.errors import EmptyCorpusError, IngestError
from charlm.ingest.format import FORMAT
from charlm.ingest.pool import _groups, _Ordered, _parallelism, _run_groups, tune_malloc, worker_function
from charlm.ingest.text import CHUNK_SIZE, Policies, TextStream, _iter_stream, _object_data
from charlm.storage import ObjectInfo
from charlm.vocab import Vocab

log = logging.getLogger("charlm.ingest")

SCAN_VERSION = 1  # bump when scanning changes its output for the same bytes (invalidates caches)
_COUNT_BLOCK = 128 << 10  # uint16 pairs per bincount call
BATCH_BYTES = 64 << 20  # objects per scan task in the flow (cache granularity)
BATCH_OBJECTS = 512


class CharCounter:
    """Character counts from UTF-8 text: ASCII via a byte histogram, the rest via code points."""

    def __init__(self) -> None:
        self.ascii = np.zeros(128, dtype=np.int64)
        self.other: dict[int, int] = {}

    def add(self, utf8: bytes, nonascii: str, leads: np.ndarray | None = None) -> int:
        """Count the characters of a piece; returns how many it holds."""
        n = len(utf8)
        if n == 0:
            return 0
        if n < 1 << 16:
            byte_counts = np.bincount(np.frombuffer(utf8, dtype=np.uint8), minlength=256)
        else:
            # Count byte pairs (half the elements) in blocks whose int64 temporaries stay in cache
            # and in the heap (big temporaries are fresh mmaps that page-fault on every chunk).
            pairs16 = np.frombuffer(utf8, dtype="<u2", count=n // 2)
            pairs = np.zeros(65536, dtype=np.int64)
            for i in range(0, len(pairs16), _COUNT_BLOCK):
                pairs += np.bincount(pairs16[i : i + _COUNT_BLOCK], minlength=65536)
            pairs = pairs.reshape(256, 256)
            byte_counts = pairs.sum(axis=0) + pairs.sum(axis=1)
            if n % 2:
                byte_counts[utf8[-1]] += 1
        self.ascii += byte_counts[:128]
        if nonascii:
            cps = np.frombuffer(nonascii.encode("utf-32-le"), dtype="<u4")
            hist = np.bincount(cps)
            for cp in np.flatnonzero(hist).tolist():
                self.other[cp] = self.other.get(cp, 0) + int(hist[cp])
        return int(byte_counts[:128].sum()) + len(nonascii)

    def to_dict(self) -> dict[int, int]:
        out = {i: int(n) for i, n in enumerate(self.ascii.tolist()) if n}
        out.update(self.other)
        return out


def scan_objects(
    objects: Sequence[ObjectInfo | dict], policies: Policies, chunk_size: int = CHUNK_SIZE
) -> list[dict[str, Any]]:
    """Pass 1 for a batch of objects (small ones fetched concurrently; large batches spread over
    worker processes, see processes())."""
    tune_malloc()
    infos = [o if isinstance(o, ObjectInfo) else ObjectInfo.from_dict(o) for o in objects]
    n = _parallelism(sum(o.size for o in infos), len(infos))
    if n > 1:
        groups = _groups(infos, [o.size for o in infos], 4 * n)
        calls = [([infos[i].to_dict() for i in g], policies, chunk_size) for g in groups]
        return [scan for part in _run_groups(_scan_sequential, calls, n) for scan in part]
    return _scan_sequential(infos, policies, chunk_size)


@worker_function
def _scan_sequential(
    objects: Sequence[ObjectInfo | dict], policies: Policies, chunk_size: int
) -> list[dict[str, Any]]:
    infos = [o if isinstance(o, ObjectInfo) else ObjectInfo.from_dict(o) for o in objects]
    with _Ordered() as hashing:
        return [scan_object(o, policies, chunk_size, data, hashing) for o, data in _object_data(infos)]


def batch_objects(objects: Sequence[ObjectInfo]) -> list[list[ObjectInfo]]:
    """Consecutive batches of at most BATCH_BYTES / BATCH_OBJECTS (one object may exceed it).

    Fixed limits, so appending objects to a corpus leaves the earlier batches (and their cached
    scans) unchanged.
    """
    batches: list[list[ObjectInfo]] = []
    size = 0
    for o in objects:
        if not batches or size + o.size > BATCH_BYTES or len(batches[-1]) >= BATCH_OBJECTS:
            if not batches or batches[-1]:
                batches.append([])
            size = 0
        batches[-1].append(o)
        size += o.size
    return batches


def scan_object(
    obj: ObjectInfo | dict,
    policies: Policies,
    chunk_size: int = CHUNK_SIZE,
    data: bytes | None = None,
    hashing: _Ordered | None = None,
) -> dict[str, Any]:
    """Pass 1 for one object: a small dict with its counts, sha256 and policy statistics.

    data: the object's bytes if already fetched; hashing: a worker for the sha256 (it releases
    the GIL, so it runs beside the counting), else one is made for this object.
    """
    obj = obj if isinstance(obj, ObjectInfo) else ObjectInfo.from_dict(obj)
    t0 = time.perf_counter()
    stream = TextStream(obj.url, policies)
    counter = CharCounter()
    h = hashlib.sha256()
    chars = 0
    with contextlib.ExitStack() as stack:
        bg = hashing or stack.enter_context(_Ordered())
        for utf8, nonascii, _ in _iter_stream(stream, obj, chunk_size, data):
            bg.update_hash(h, utf8)
            chars += counter.add(utf8, nonascii)
        bg.drain()
    return {
        **obj.to_dict(),
        "chars": chars,
        "sha256": h.hexdigest(),
        "counts": counter.to_dict(),
        "bom": stream.bom,
        "crlf": stream.crlf,
        "cr": stream.cr,
        "replaced": stream.replaced,
        "first_replaced_offset": stream.first_replaced,
        "normalized": stream.normalized,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def list_sources(sources: Sequence[str] | str) -> list[ObjectInfo]:
    """Objects of every source, each source sorted by URL, sources in the order given, no repeats."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise IngestError("no sources given")
    seen: set[str] = set()
    out: list[ObjectInfo] = []
    for src in sources:
        for o in storage.list_objects(src):
            if o.url not in seen:
                seen.add(o.url)
                out.append(o)
    return out


def check_scans(scans: Sequence[dict[str, Any]]) -> list[str]:
    """Warnings for skipped (empty) objects; EmptyCorpusError when no object has characters."""
    warnings = [f"{s['url']}: empty object skipped" for s in scans if not s["chars"]]
    for w in warnings:
        log.warning(w)
    if all(not s["chars"] for s in scans):
        n = len(scans)
        raise EmptyCorpusError(
            f"corpus is empty: {n} object{'s' if n != 1 else ''} and no characters"
            + (f" ({scans[0]['url']}{', ...' if n > 1 else ''})" if n else "")
        )
    for s in scans:
        if s["replaced"]:
            log.warning(
                "%s: %d invalid UTF-8 sequence(s) replaced by U+FFFD (first at byte offset %s)",
                s["url"],
                s["replaced"],
                s["first_replaced_offset"],
            )
    return warnings


def merge_counts(scans: Iterable[dict[str, Any]]) -> dict[str, int]:
    total: dict[int, int] = {}
    for s in scans:
        for cp, n in s["counts"].items():
            total[int(cp)] = total.get(int(cp), 0) + int(n)
    return {chr(cp): n for cp, n in total.items()}


def build_vocab(scans: Sequence[dict[str, Any]]) -> Vocab:
    return Vocab.from_counts(merge_counts(scans))


def dataset_id(policies: Policies, scans: Sequence[dict[str, Any]]) -> str:
    """sha256 over format, policies and the per-object digests of the normalized text."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}\n{json.dumps(policies.to_dict(), sort_keys=True)}\n".encode())
    for s in scans:
        if s["chars"]:
            h.update(f"{s['sha256']}\n".encode())
    return h.hexdigest()
