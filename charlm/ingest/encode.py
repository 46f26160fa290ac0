"""Pass 2, the encoding: each object's normalized text to ids for the dataset's vocabulary,
checked against its scan, written into the split files (as a stream, or in place by worker
processes for a local store)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from charlm import storage
from charlm.ingest.errors import SourceChangedError
from charlm.ingest.format import SPLITS
from charlm.ingest.pool import _groups, _Ordered, _run_groups, worker_function
from charlm.ingest.text import CHUNK_SIZE, Policies, TextStream, _iter_stream, _object_data
from charlm.storage import ObjectInfo
from charlm.vocab import Vocab


def npy_header(dtype: np.dtype, n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
    )
    return buf.getvalue()


_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


class _Encoder:
    """Normalized UTF-8 pieces -> ids for a fixed vocabulary, vectorised.

    Vocabularies of at most 255 characters (uint8 ids, the usual case) are encoded on the bytes,
    with bytes.translate (a table lookup per byte, in C):
    - no non-ASCII character in the piece: one translate, ASCII byte -> id;
    - at most 64 non-ASCII characters in the vocabulary: each gets a code byte 0xC0 + j, written
      over the lead byte of its occurrences (their positions come from validation), and one
      translate maps ASCII bytes and codes to ids while deleting the continuation bytes;
    - otherwise a marker byte instead of the codes, ids written at the leads, markers deleted.
    Larger vocabularies go through UTF-16/UTF-32 code units and a lookup table.
    """

    MARK = 255

    def __init__(self, vocab: Vocab) -> None:
        self.dtype = vocab.dtype
        cps = np.array([ord(c) for c in vocab.chars], dtype=np.int64)
        self.wide = bool(cps.max() > 0xFFFF)  # astral characters: UTF-32 code units, else UTF-16
        self.lut = np.zeros(0x110000 if self.wide else 0x10000, dtype=self.dtype)
        self.lut[cps] = np.arange(len(cps), dtype=self.dtype)
        self.bytewise = len(vocab) <= self.MARK
        if not self.bytewise:
            return
        table = np.full(256, self.MARK, dtype=np.uint8)
        table[:128] = self.lut[:128]
        self.table = table.tobytes()
        wide_cps = cps[cps >= 128]
        self.coded = len(wide_cps) <= 64
        if self.coded:  # code byte of each non-ASCII character, and a table from codes to ids
            self.code = np.zeros(len(self.lut), dtype=np.uint8)
            self.code[wide_cps] = 0xC0 + np.arange(len(wide_cps))
            table[0xC0 : 0xC0 + len(wide_cps)] = self.lut[wide_cps]
            self.code_table = table.tobytes()

    def encode(self, utf8: bytes, nonascii: str | None, leads: np.ndarray | None = None) -> np.ndarray:
        """Ids of a piece. nonascii=None: not validated (second pass); the code points are then
        read from the bytes at the leads, and text that is not what was scanned gives wrong ids
        (never an error here): the caller's digest check rejects it."""
        if not self.bytewise:
            try:
                text = utf8.decode("utf-8")
            except UnicodeDecodeError:
                raise SourceChangedError("encoded text is not valid UTF-8; a source changed") from None
            if self.wide:
                return self.lut[np.frombuffer(text.encode("utf-32-le"), dtype="<u4")]
            return self.lut[np.frombuffer(text.encode("utf-16-le"), dtype="<u2")]
        if nonascii == "" or (nonascii is None and utf8.isascii()):
            return np.frombuffer(utf8.translate(self.table), dtype=np.uint8)
        a = np.frombuffer(utf8, dtype=np.uint8)
        if leads is None:
            leads = np.flatnonzero(a >= 0xC0)
        if nonascii is None:
            units = np.minimum(_code_points_at(a, leads), len(self.lut) - 1)
        else:
            units = np.frombuffer(
                nonascii.encode("utf-32-le" if self.wide else "utf-16-le"),
                dtype="<u4" if self.wide else "<u2",
            )
            if len(units) != len(leads):
                raise SourceChangedError("encoded text does not match its scan; a source changed")
        if self.coded:
            buf = bytearray(utf8)
            np.frombuffer(buf, dtype=np.uint8)[leads] = self.code[units]
            return np.frombuffer(buf.translate(self.code_table, _CONTINUATION_BYTES), dtype=np.uint8)
        buf = bytearray(utf8.translate(self.table))
        np.frombuffer(buf, dtype=np.uint8)[leads] = self.lut[units]
        return np.frombuffer(buf.translate(None, bytes([self.MARK])), dtype=np.uint8)


def _code_points_at(a: np.ndarray, leads: np.ndarray) -> np.ndarray:
    """Code points of the UTF-8 sequences starting at leads (vectorised; assumes valid UTF-8)."""
    last = len(a) - 1
    b0 = a[leads].astype(np.uint32)
    c1, c2, c3 = (a[np.minimum(leads + k, last)].astype(np.uint32) & 0x3F for k in (1, 2, 3))
    two = ((b0 & 0x1F) << 6) | c1
    three = ((b0 & 0x0F) << 12) | (c1 << 6) | c2
    four = ((b0 & 0x07) << 18) | (c1 << 12) | (c2 << 6) | c3
    return np.where(b0 < 0xE0, two, np.where(b0 < 0xF0, three, four))


class _SplitWriter:
    """Writes a stream of ids into train|val|test .npy files, one at a time, in order."""

    def __init__(self, folder: str, sizes: dict[str, int], dtype: np.dtype) -> None:
        self.folder = folder
        self.sizes = sizes
        self.dtype = np.dtype(dtype)
        self.written: dict[str, int] = {}
        self._queue = [s for s in SPLITS]
        self._cm: Any = None
        self._f: Any = None
        self._name = ""
        self._left = 0
        self._next()

    def _next(self) -> None:
        self._close_current()
        while self._queue:
            name = self._queue.pop(0)
            self._name, self._left = name, self.sizes[name]
            self._cm = storage.atomic_writer(storage.join(self.folder, f"{name}.npy"))
            self._f = self._cm.__enter__()
            self._f.write(npy_header(self.dtype, self.sizes[name]))
            self.written[name] = 0
            if self._left:
                return
            self._close_current()

    def _close_current(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

    def write(self, ids: np.ndarray) -> None:
        pos = 0
        while pos < len(ids):
            if self._cm is None:
                raise SourceChangedError(f"{self.folder}: more characters than scanned; a source changed")
            take = min(self._left, len(ids) - pos)
            self._f.write(memoryview(np.ascontiguousarray(ids[pos : pos + take])).cast("B"))
            self.written[self._name] += take
            self._left -= take
            pos += take
            if self._left == 0:
                self._next()

    def close(self) -> None:
        if self._cm is not None or self._queue:
            raise SourceChangedError(f"{self.folder}: fewer characters than scanned; a source changed")

    def abort(self, exc: BaseException) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            with contextlib.suppress(BaseException):
                cm.__exit__(type(exc), exc, exc.__traceback__)


def encode_object(
    obj: dict[str, Any],
    policies: Policies,
    encoder: _Encoder,
    write: Any,
    hashing: _Ordered,
    chunk_size: int = CHUNK_SIZE,
    data: bytes | None = None,
) -> None:
    """Pass 2 for one object: ids to write(); checks it is still the text that was scanned.

    The sha256 of the text runs on the `hashing` worker and write() is expected to hand the ids
    to another one: both release the GIL and each costs about as much as the encoding itself.
    """
    info = ObjectInfo.from_dict(obj)
    # text the first pass found valid is not validated again: the digest check covers it
    stream = TextStream(info.url, policies, check=bool(obj.get("replaced")))
    h = hashlib.sha256()
    n = 0
    for utf8, nonascii, leads in _iter_stream(stream, info, chunk_size, data):
        ids = encoder.encode(utf8, nonascii, leads)
        n += len(ids)
        hashing.update_hash(h, utf8)
        write(ids)
    hashing.drain()
    if h.hexdigest() != obj["sha256"] or n != obj["chars"]:
        raise SourceChangedError(f"{info.url}: object changed between scan and encode; run ingest again")


def _encode_sequential(
    nonempty: Sequence[dict[str, Any]],
    policies: Policies,
    vocab: Vocab,
    folder: str,
    sizes: dict[str, int],
    chunk_size: int,
) -> None:
    """Pass 2 in this process, written as a stream (any store)."""
    encoder = _Encoder(vocab)
    writer = _SplitWriter(folder, sizes, vocab.dtype)
    try:
        with _Ordered() as hashing, _Ordered() as writing:

            def write(ids: np.ndarray) -> None:
                writing.submit(writer.write, ids)

            infos = [ObjectInfo.from_dict(s) for s in nonempty]
            for s, (_, data) in zip(nonempty, _object_data(infos), strict=True):
                encode_object(s, policies, encoder, write, hashing, chunk_size, data)
            writing.drain()
        writer.close()
    except BaseException as e:
        writer.abort(e)
        raise


def _split_layout(sizes: dict[str, int], dtype: np.dtype) -> list[tuple[str, int, int, int]]:
    """(split, first global id index, number of ids, header bytes) for each split, in order."""
    out, start = [], 0
    for k in SPLITS:
        out.append((k, start, sizes[k], len(npy_header(dtype, sizes[k]))))
        start += sizes[k]
    return out


@worker_function
def _encode_group(
    group: list[dict[str, Any]],
    start: int,
    policies: Policies,
    vocab_dict: dict[str, Any],
    paths: dict[str, str],
    layout: list[tuple[str, int, int, int]],
    chunk_size: int,
) -> int:
    """In a worker: encode consecutive objects whose ids begin at global index `start`, writing
    them in place (pwrite) into the preallocated split files. Returns the ids written."""
    vocab = Vocab.from_dict(vocab_dict)
    encoder = _Encoder(vocab)
    item = vocab.dtype.itemsize
    fds = {k: os.open(p, os.O_WRONLY) for k, p in paths.items()}
    pos = start

    def write(ids: np.ndarray) -> None:
        nonlocal pos
        data = memoryview(np.ascontiguousarray(ids)).cast("B")
        end = pos + len(ids)
        for k, first, n, header in layout:
            lo, hi = max(pos, first), min(end, first + n)
            if lo < hi:
                os.pwrite(fds[k], data[(lo - pos) * item : (hi - pos) * item], header + (lo - first) * item)
        pos = end

    try:
        with _Ordered() as hashing:
            infos = [ObjectInfo.from_dict(s) for s in group]
            for s, (_, data) in zip(group, _object_data(infos), strict=True):
                encode_object(s, policies, encoder, write, hashing, chunk_size, data)
    finally:
        for fd in fds.values():
            os.close(fd)
    return pos - start


def _encode_parallel(
    nonempty: Sequence[dict[str, Any]],
    policies: Policies,
    vocab: Vocab,
    folder: str,
    sizes: dict[str, int],
    chunk_size: int,
    n_proc: int,
) -> None:
    """Pass 2 over worker processes, for a local store: every object's ids have a known place
    (prefix sums of the scanned character counts), so workers write them in place into
    preallocated temp files, which are renamed into place once all are complete."""
    base = storage.local_path(folder)
    assert base is not None
    layout = _split_layout(sizes, vocab.dtype)
    tmp = {k: os.path.join(base, f".{k}.npy.tmp-{os.getpid()}-{secrets.token_hex(4)}") for k in SPLITS}
    try:
        for k, _, n, header in layout:
            with open(tmp[k], "wb") as f:
                f.write(npy_header(vocab.dtype, n))
                f.truncate(header + n * vocab.dtype.itemsize)
        starts = np.concatenate([[0], np.cumsum([s["chars"] for s in nonempty])]).tolist()
        groups = _groups(nonempty, [s["size"] for s in nonempty], 4 * n_proc)
        calls = [
            ([nonempty[i] for i in g], starts[g[0]], policies, vocab.to_dict(), tmp, layout, chunk_size)
            for g in groups
        ]
        written = sum(_run_groups(_encode_group, calls, n_proc))
        if written != sum(sizes.values()):
            raise SourceChangedError(f"{folder}: {written} ids encoded, {sum(sizes.values())} scanned")
        for k in SPLITS:
            fd = os.open(tmp[k], os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp[k], os.path.join(base, f"{k}.npy"))
    finally:
        for p in tmp.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
