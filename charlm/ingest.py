"""Corpus ingestion: stream objects from any storage URL into a versioned, encoded dataset.

Two streaming passes, memory independent of corpus size (a few read chunks at a time):

1. scan (per object, independent, cacheable): decode UTF-8 incrementally, apply the text
   policies, count characters, sha256 the normalized text;
2. publish (sequential): build the vocabulary from the merged counts, re-stream every object
   through the same decoder, encode to ids, write ``train|val|test.npy``, ``vocab.json`` and
   finally ``manifest.json``.

Text policies (docs/ingest.md has the full statement):

- encoding: UTF-8 only. ``invalid="strict"`` (default) stops at the first invalid byte with an
  error naming the object and byte offset; ``"replace"`` substitutes U+FFFD for each maximal
  invalid subsequence (Python's ``errors="replace"`` semantics) and reports how many.
- BOM: a UTF-8 byte-order mark (U+FEFF) at the start of every object is removed; U+FEFF anywhere
  else is kept (it is a zero-width no-break space there).
- newlines: ``"lf"`` (default) turns CRLF and lone CR into LF (a CR at the end of a read chunk is
  held back until the next chunk shows whether an LF follows); ``"keep"`` leaves them as they are.
- binary: an object holding a NUL byte anywhere, or whose first 8 KiB are more than 10% control
  bytes other than TAB, LF, VT, FF, CR and ESC, is binary-looking: an error names it. Isolated
  control characters in a text object are kept as characters.
- empty: objects with no characters after the policies (zero bytes, or only a BOM) are skipped with
  a warning; a corpus with no characters at all is an error.
- normalization (optional, ``NFC|NFD|NFKC|NFKD``): applied per object after the newline policy.
  Streaming keeps the text after the last *normalization boundary* of each chunk (a character
  with canonical combining class 0 that cannot combine with what precedes it) for the next chunk,
  so the result equals normalizing the whole object at once. A run of more than 4 Mi characters
  with no such boundary (not real text) is normalized in pieces.

Objects are processed independently (policies apply per object, a CR at the end of one object is
a newline of its own) and joined as-is, in listing order, with nothing inserted between them.
The dataset id is sha256 over the format tag, the policies (including split fractions) and the
sequence of per-object sha256 digests of the normalized text (empty objects contribute nothing),
so the same text under the same policies always gets the same id, and any change of a character,
of object order or of a policy gives a new id. Names, ETags and mtimes are not part of it.

This module does not import Prefect; flows/ingest.py wires these functions into tasks.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import queue
import secrets
import struct
import subprocess
import sys
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from charlm import __version__, storage
from charlm.storage import ObjectInfo
from charlm.vocab import Vocab, describe_char

log = logging.getLogger("charlm.ingest")

FORMAT = "charlm-dataset/1"
SCAN_VERSION = 1  # bump when scanning changes its output for the same bytes (invalidates caches)
SPLITS = ("train", "val", "test")
CHUNK_SIZE = 1 << 20  # measured best of 1, 2, 4 MiB (cache-sized temporaries)
NEWLINES = ("lf", "keep")
INVALID = ("strict", "replace")
NORMAL_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
SNIFF_BYTES = 8192
BINARY_CONTROL_FRAC = 0.10
_NORM_TAIL_LIMIT = 4 << 20
_COUNT_BLOCK = 128 << 10  # uint16 pairs per bincount call
SMALL_OBJECT = 1 << 20  # objects up to this size are fetched whole, many at a time
GROUP_BYTES = 32 << 20
GROUP_OBJECTS = 256
_INLINE_HASH = 256 << 10  # smaller pieces are hashed in the calling thread
BATCH_BYTES = 64 << 20  # objects per scan task in the flow (cache granularity)
BATCH_OBJECTS = 512

_CONTROL_BYTES = bytes(c for c in range(32) if c not in (9, 10, 11, 12, 13, 27)) + b"\x7f"
_NON_CONTROL = bytes(c for c in range(256) if c not in _CONTROL_BYTES)
_ASCII_BYTES = bytes(range(128))


# -- errors -----------------------------------------------------------------------------------------
class IngestError(ValueError):
    """Ingestion cannot go on; the message (one line) names the object and the problem."""


class InvalidUTF8Error(IngestError):
    def __init__(self, url: str, offset: int, bad: bytes, hint: str = "") -> None:
        self.url, self.offset, self.bad, self.hint = url, offset, bad, hint
        super().__init__(
            f"{url}: invalid UTF-8 at byte offset {offset} (bytes {bad.hex(' ')}){hint}; "
            "fix the object or ingest with --invalid replace"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.url, self.offset, self.bad, self.hint))


class BinaryObjectError(IngestError):
    pass


class EmptyCorpusError(IngestError):
    pass


class SourceChangedError(IngestError):
    """An object changed while it was being ingested (between listing, scan and encode)."""


# -- policies -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policies:
    """Every choice that changes the dataset's content; all of it goes into the dataset id."""

    newlines: str = "lf"
    invalid: str = "strict"
    normalize: str | None = None
    val_frac: float = 0.05
    test_frac: float = 0.05

    def __post_init__(self) -> None:
        if self.newlines not in NEWLINES:
            raise ValueError(f"newlines must be one of {NEWLINES}, got {self.newlines!r}")
        if self.invalid not in INVALID:
            raise ValueError(f"invalid must be one of {INVALID}, got {self.invalid!r}")
        if self.normalize is not None and self.normalize not in NORMAL_FORMS:
            raise ValueError(f"normalize must be one of {NORMAL_FORMS} or None, got {self.normalize!r}")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError("need 0 <= val_frac, 0 <= test_frac and val_frac + test_frac < 1")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bom": "strip", "encoding": "utf-8", "join": "concat"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policies:
        names = ("newlines", "invalid", "normalize", "val_frac", "test_frac")
        return cls(**{k: d[k] for k in names if k in d})

    def text_key(self) -> dict[str, Any]:
        """The part of the policies that decides an object's text (what a scan depends on)."""
        return {"newlines": self.newlines, "invalid": self.invalid, "normalize": self.normalize}


def split_sizes(n: int, val_frac: float, test_frac: float) -> dict[str, int]:
    """Same arithmetic as charlm.data.split_ids: contiguous train | val | test."""
    n_test = round(n * test_frac)
    n_val = round(n * val_frac)
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


# -- decoding with policies -------------------------------------------------------------------------
_tls = threading.local()


def _count_replace(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _tls.replaced = getattr(_tls, "replaced", 0) + 1
    if getattr(_tls, "first", None) is None:
        _tls.first = exc.start
    return "\ufffd", exc.end


codecs.register_error("charlm.replace", _count_replace)


def _utf16_hint(head: bytes) -> str:
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return " (it starts with a UTF-16 byte-order mark; charlm reads UTF-8 only)"
    return ""


@functools.lru_cache(maxsize=1)
def _composes_backward() -> frozenset[str]:
    """Characters that can combine with a preceding character under canonical composition."""
    out = {chr(cp) for cp in range(0x1161, 0x1176)} | {chr(cp) for cp in range(0x11A8, 0x11C3)}
    for cp in range(0x300, 0x110000):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<"):
            parts = d.split()
            if len(parts) == 2:
                out.add(chr(int(parts[1], 16)))
    return frozenset(out)


@functools.lru_cache(maxsize=65536)
def _boundary_before(c: str, form: str) -> bool:
    """Normalizing text[:i] and text[i:] separately equals normalizing text when text[i] is c."""
    if c < "\u0300" or "\u4e00" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7a3":
        return True
    first = unicodedata.normalize("NFKD" if form.startswith("NFK") else "NFD", c)[:1]
    return bool(first) and unicodedata.combining(first) == 0 and first not in _composes_backward()


def _last_boundary(text: str, form: str) -> int:
    for i in range(len(text) - 1, -1, -1):
        if _boundary_before(text[i], form):
            return i
    return 0


_BOM = b"\xef\xbb\xbf"


def split_incomplete(b: bytes) -> tuple[bytes, bytes]:
    """(head, tail): tail is a trailing sequence that more bytes could complete (at most 3 bytes).

    The cut is always just before a lead byte, which is where a UTF-8 decoder starts a new
    sequence, so decoding head and tail+next separately equals decoding the whole (also under
    errors="replace").
    """
    n = len(b)
    for back in range(1, min(3, n) + 1):
        c = b[n - back]
        if c < 0x80:
            return b, b""
        if c >= 0xC0:
            need = 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            return (b[: n - back], b[n - back :]) if back < need else (b, b"")
    return b, b""


def nonascii_if_valid(b: bytes) -> tuple[str, np.ndarray | None] | None:
    """(the non-ASCII characters of b in order, positions of their lead bytes) if b is valid UTF-8;
    None if it is not.

    Vectorised: the non-ASCII bytes alone are decoded (they are rare in most text), and numpy
    checks that each lead byte is followed by its continuation bytes in b.
    """
    if b.isascii():
        return "", None
    try:
        rest = b.translate(None, _ASCII_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        return None
    a = np.frombuffer(b, dtype=np.uint8)
    leads = np.flatnonzero(a >= 0xC0)
    first = a[leads]
    n = len(a)
    for k, lead_min in ((1, 0xC0), (2, 0xE0), (3, 0xF0)):
        pos = leads[first >= lead_min] + k
        if pos.size and (pos[-1] >= n or bool(((a[pos] & 0xC0) != 0x80).any())):
            return None
    return rest, leads


Piece = tuple[bytes, "str | None", "np.ndarray | None"]


class TextStream:
    """One object's bytes in, the UTF-8 of its normalized text out: decoding plus the policies.

    Works on bytes: valid chunks are checked (not decoded) and passed through, so the common
    case costs a few passes of C over the bytes. feed() returns a Piece (utf8, nonascii, leads):
    nonascii is the string of the non-ASCII characters of utf8, in order, and leads the positions
    of their first bytes in utf8 (None when not known): what counting and encoding need.
    Statistics accumulate on the stream.
    """

    def __init__(self, url: str, policies: Policies, check: bool = True) -> None:
        """check=False (the second pass over text the first pass found valid): no validation,
        and pieces carry nonascii=None; the caller verifies the text by its digest."""
        self.url = url
        self.p = policies
        self.check = check
        self.offset = 0  # raw bytes fed so far
        self.out_bytes = 0
        self.bom = 0
        self.crlf = 0
        self.cr = 0
        self.replaced = 0
        self.first_replaced: int | None = None
        self.normalized = False
        self._sniff = bytearray()  # the first SNIFF_BYTES of the object
        self._sniffed = False
        self._pending = b""
        self._at_start = True
        self._cr_carry = False
        self._tail = ""

    def _check_binary(self, data: bytes, final: bool) -> None:
        nul = data.find(b"\x00")
        if nul >= 0:
            raise BinaryObjectError(
                f"{self.url}: binary-looking object (NUL byte at offset {self.offset + nul})"
                f"{_utf16_hint(bytes(self._sniff[:2]) or data[:2])}; not ingested"
            )
        if self._sniffed:
            return
        self._sniff += data[: SNIFF_BYTES - len(self._sniff)]
        if len(self._sniff) >= SNIFF_BYTES or final:
            self._sniffed = True
            head = bytes(self._sniff)
            n_ctrl = len(head.translate(None, _NON_CONTROL))
            if n_ctrl > BINARY_CONTROL_FRAC * len(head):
                raise BinaryObjectError(
                    f"{self.url}: binary-looking object ({n_ctrl} of its first {len(head)} bytes are "
                    "control bytes); not ingested"
                )

    def _decode_invalid(self, b: bytes, start: int) -> bytes:
        """b is not valid UTF-8: raise (strict) or replace and count (replace)."""
        if self.p.invalid == "strict":
            try:
                b.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidUTF8Error(
                    self.url,
                    start + e.start,
                    e.object[e.start : e.end][:8],
                    _utf16_hint(bytes(self._sniff[:2])),
                ) from None
            raise AssertionError("unreachable: invalid UTF-8 decoded")  # pragma: no cover
        _tls.replaced, _tls.first = 0, None
        text = b.decode("utf-8", "charlm.replace")
        if self.first_replaced is None and _tls.first is not None:
            self.first_replaced = start + _tls.first
        self.replaced += _tls.replaced
        return text.encode("utf-8")

    def feed(self, data: bytes, final: bool = False) -> Piece:
        self._check_binary(data, final)
        b = self._pending + data if self._pending else data
        start = self.offset - len(self._pending)  # object offset of b[0]
        self.offset += len(data)
        if final:
            self._pending = b""
        else:
            b, self._pending = split_incomplete(b)

        rest: str | None
        if not self.check:
            rest = None if not b.isascii() else ""
            leads = None if rest == "" else np.flatnonzero(np.frombuffer(b, dtype=np.uint8) >= 0xC0)
        elif (valid := nonascii_if_valid(b)) is None:
            b = self._decode_invalid(b, start)
            rest, leads = b.translate(None, _ASCII_BYTES).decode("utf-8"), None
        else:
            rest, leads = valid

        if self._at_start and b:
            self._at_start = False
            if b.startswith(_BOM):
                b, rest = b[3:], rest[1:] if rest is not None else None
                leads = leads[1:] - 3 if leads is not None else None
                self.bom = 1
        if self.p.newlines == "lf":
            if self._cr_carry:
                b = b"\r" + b
                self._cr_carry = False
                leads = None
            if not final and b.endswith(b"\r"):
                b = b[:-1]
                self._cr_carry = True
            if b"\r" in b:
                n_crlf = b.count(b"\r\n")
                self.crlf += n_crlf
                self.cr += b.count(b"\r") - n_crlf
                b = b.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                leads = None
        form = self.p.normalize
        if form:
            text = self._tail + b.decode("utf-8")
            self._tail = ""
            if not final and text:
                cut = _last_boundary(text, form)
                if cut > 0 or len(text) <= _NORM_TAIL_LIMIT:
                    self._tail, text = text[cut:], text[:cut]
            if text and not unicodedata.is_normalized(form, text):
                text = unicodedata.normalize(form, text)
                self.normalized = True
            b = text.encode("utf-8")
            rest = "" if text.isascii() else b.translate(None, _ASCII_BYTES).decode("utf-8")
            leads = None
        elif rest is None and leads is None and not b.isascii():  # bytes moved by the newline policy
            leads = np.flatnonzero(np.frombuffer(b, dtype=np.uint8) >= 0xC0)
        self.out_bytes += len(b)
        return b, rest, leads

    def finish(self) -> Piece:
        return self.feed(b"", final=True)


def _read_chunks(url: str, chunk_size: int) -> Iterator[bytes]:
    """An object's bytes in chunks, read one chunk ahead in a thread (I/O overlaps decoding)."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with storage.open_read(url, block_size=chunk_size) as f:
                while not stop.is_set():
                    b = f.read(chunk_size)
                    if not put(("data", b)) or not b:
                        return
        except BaseException as e:
            put(("error", e))

    t = threading.Thread(target=produce, name="charlm-read", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "error":
                raise item
            if not item:
                return
            yield item
    finally:
        stop.set()
        t.join()


def _object_data(objects: Sequence[ObjectInfo]) -> Iterator[tuple[ObjectInfo, bytes | None]]:
    """(object, its bytes) for small objects, fetched concurrently in groups; (object, None) for
    large ones, which are streamed. Bounded memory: a group holds at most GROUP_BYTES. Objects the
    listing shows as empty are not read at all."""
    group: list[ObjectInfo] = []
    size = 0

    def flush() -> Iterator[tuple[ObjectInfo, bytes | None]]:
        datas = iter(storage.read_many([o.url for o in group if o.size]))
        for o in group:  # objects listed as empty are not fetched
            yield o, next(datas) if o.size else b""

    for o in objects:
        if o.size > SMALL_OBJECT:
            if group:
                yield from flush()
                group, size = [], 0
            yield o, None
            continue
        if group and (size + o.size > GROUP_BYTES or len(group) >= GROUP_OBJECTS):
            yield from flush()
            group, size = [], 0
        group.append(o)
        size += o.size
    if group:
        yield from flush()


def iter_utf8(
    obj: ObjectInfo, policies: Policies, chunk_size: int = CHUNK_SIZE, data: bytes | None = None
) -> Iterator[Piece]:
    """(utf8, nonascii, leads) pieces of one object's normalized text (see TextStream)."""
    yield from _iter_stream(TextStream(obj.url, policies), obj, chunk_size, data)


def iter_text(obj: ObjectInfo, policies: Policies, chunk_size: int = CHUNK_SIZE) -> Iterator[str]:
    """One object's normalized text as str pieces (streaming; for previews and tests)."""
    for utf8, _, _ in iter_utf8(obj, policies, chunk_size):
        yield utf8.decode("utf-8")


def _iter_stream(
    stream: TextStream, obj: ObjectInfo, chunk_size: int, data: bytes | None = None
) -> Iterator[Piece]:
    if data is None:
        chunks: Iterable[bytes] = _read_chunks(obj.url, chunk_size)
    else:
        chunks = (data[i : i + chunk_size] for i in range(0, len(data), chunk_size))
    for chunk in chunks:
        piece = stream.feed(chunk)
        if piece[0]:
            yield piece
    piece = stream.finish()
    if piece[0]:
        yield piece
    if stream.offset != obj.size:
        raise SourceChangedError(
            f"{obj.url}: object changed during ingestion (listed {obj.size} bytes, read {stream.offset}); "
            "run ingest again"
        )


@functools.lru_cache(maxsize=1)
def tune_malloc() -> bool:
    """Let glibc reuse freed chunk-sized buffers instead of page-faulting fresh ones (once).

    Each read chunk allocates and frees a few buffers of its size. By default glibc serves such
    sizes with fresh mmaps, or gives the freed top of the heap back to the system, so every chunk
    faults its buffers in again: a third of the CPU time of ingestion, measured. Raising the mmap
    and trim thresholds keeps them in the heap; the cost is that up to 64 MiB of freed memory
    stays with the process. Only on glibc; CHARLM_MALLOC_TUNING=0 turns it off.
    """
    if os.environ.get("CHARLM_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 64 << 20))


class _Ordered:
    """Runs calls in submission order on one worker thread, at most `depth` outstanding.

    Used for the work that releases the GIL (sha256, numpy lookups, writes) so that it runs on a
    second core while the main thread checks the next chunk.
    """

    def __init__(self, depth: int = 2) -> None:
        self._ex = ThreadPoolExecutor(1, thread_name_prefix="charlm-ingest")
        self._pending: deque[Future[Any]] = deque()
        self._depth = depth

    def submit(self, fn: Any, *args: Any) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._ex.submit(fn, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> _Ordered:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._pending:
            f.cancel()
        self._ex.shutdown(wait=True)


# -- processes ----------------------------------------------------------------------------------------
# A scan or an encode is CPU-bound under the GIL, so beyond one core the work is spread over
# worker processes, object by object (an object is never split). Workers are fresh interpreters
# (`python -c ...`, not fork: s3fs and the caller's threads are not fork-safe; not
# multiprocessing's spawn either, which re-runs the caller's main script), kept for the life of
# the process, and used only for corpora large enough to repay their start-up (~0.3 s).
PARALLEL_MIN_BYTES = 48 << 20
_in_worker = False
_pool: _WorkerPool | None = None


def processes() -> int:
    """Worker processes for ingestion: $CHARLM_INGEST_PROCESSES, else the usable CPUs (max 4)."""
    env = os.environ.get("CHARLM_INGEST_PROCESSES")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return min(n, 4)


def _parallelism(total_bytes: int, n_objects: int) -> int:
    if _in_worker or n_objects < 2 or total_bytes < PARALLEL_MIN_BYTES:
        return 1
    return min(processes(), n_objects)


def _send(f: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)))
    f.write(data)
    f.flush()


def _recv(f: Any) -> Any:
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(f.read(n))


def _serve() -> None:
    """A worker's loop: (function name, args) in on stdin, (ok, result or exception) out."""
    global _in_worker
    _in_worker = True
    tune_malloc()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, not into the protocol
    inp = sys.stdin.buffer
    while True:
        try:
            name, args = _recv(inp)
        except EOFError:
            return
        try:
            reply: tuple[bool, Any] = (True, globals()[name](*args))
        except BaseException as e:
            try:
                pickle.dumps(e)
                reply = (False, e)
            except Exception:
                reply = (False, IngestError(f"{type(e).__name__}: {e}"))
        _send(out, reply)


class _WorkerPool:
    """n worker interpreters; call(i, name, args) runs charlm.ingest.<name>(*args) in worker i."""

    def __init__(self, n: int) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        cmd = [sys.executable, "-c", "from charlm.ingest import _serve; _serve()"]
        self.n = n
        self.key = _pool_key(n)
        self.broken = False
        self._procs = [
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) for _ in range(n)
        ]

    def call(self, i: int, name: str, args: tuple[Any, ...]) -> Any:
        p = self._procs[i]
        try:
            _send(p.stdin, (name, args))
            ok, value = _recv(p.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            self.broken = True
            raise IngestError(f"an ingest worker process died ({type(e).__name__}: {e})") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        for p in self._procs:
            with contextlib.suppress(Exception):
                p.stdin.close()  # the worker exits at end of input
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def _pool_key(n: int) -> tuple[Any, ...]:
    # workers get the environment when they start: a changed endpoint or credential needs new ones
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "CHARLM_", "FSSPEC_"))))
    return (os.getpid(), n, env)


_pool_lock = threading.Lock()


def _workers(n: int) -> _WorkerPool:
    """The process's pool of n workers (made on first use, renewed if the environment changed)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.broken or _pool.key != _pool_key(n):
            if _pool is not None and _pool.key[0] == os.getpid():
                _pool.close()
            _pool = _WorkerPool(n)
            atexit.register(_pool.close)
        return _pool


def _run_groups(name: str, calls: list[tuple[Any, ...]], n: int) -> list[Any]:
    """globals()[name](*args) for every args in calls, over n participants: this process and
    n - 1 workers, each taking the next call when done (so this process works while workers
    start). Results in order; the first error (in call order) is raised once all have stopped."""
    fn = globals()[name]
    pool = _workers(n - 1)
    results: list[Any] = [None] * len(calls)
    errors: dict[int, BaseException] = {}
    lock = threading.Lock()
    next_call = iter(range(len(calls)))

    def take() -> int | None:
        with lock:
            return None if errors else next(next_call, None)

    def run(worker: int | None) -> None:
        while (i := take()) is not None:
            try:
                results[i] = fn(*calls[i]) if worker is None else pool.call(worker, name, calls[i])
            except BaseException as e:
                with lock:
                    errors[i] = e
                return

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(n - 1)]
    for t in threads:
        t.start()
    try:
        run(None)
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[min(errors)]
    return results


def _groups(items: Sequence[Any], sizes: Sequence[int], n_groups: int) -> list[list[int]]:
    """Indices of items cut into at most n_groups contiguous runs of about equal total size."""
    total = sum(sizes) or 1
    groups: list[list[int]] = [[]]
    acc = 0
    for i, size in enumerate(sizes):
        if groups[-1] and acc >= total * len(groups) / n_groups:
            groups.append([])
        groups[-1].append(i)
        acc += size
    return groups


# -- pass 1: scan -------------------------------------------------------------------------------------
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
        return [scan for part in _run_groups("_scan_sequential", calls, n) for scan in part]
    return _scan_sequential(infos, policies, chunk_size)


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
            if len(utf8) < _INLINE_HASH:
                bg.drain()
                h.update(utf8)
            else:
                bg.submit(h.update, utf8)
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


# -- pass 2: encode and publish ---------------------------------------------------------------------------
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


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest of a dataset folder, or None if there is none (an unpublished dataset)."""
    url = storage.join(folder, "manifest.json")
    try:
        data = storage.read_bytes(url)
    except storage.ObjectNotFoundError:
        return None
    try:
        m = json.loads(data)
    except ValueError as e:
        raise IngestError(f"{url}: not a readable manifest ({e})") from None
    return m


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
        if len(utf8) < _INLINE_HASH:
            hashing.drain()
            h.update(utf8)
        else:
            hashing.submit(h.update, utf8)
        write(ids)
    hashing.drain()
    if h.hexdigest() != obj["sha256"] or n != obj["chars"]:
        raise SourceChangedError(f"{info.url}: object changed between scan and encode; run ingest again")


def publish(
    scans: Sequence[dict[str, Any]],
    policies: Policies,
    store: str | None = None,
    *,
    name: str | None = None,
    requested: Sequence[str] = (),
    vocab: Vocab | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> dict[str, Any]:
    """Pass 2: encode every object and publish datasets/<id>/ (manifest last).

    A no-op when datasets/<id>/manifest.json already exists: the existing dataset is returned
    with reused=True and nothing is written.
    """
    warnings = check_scans(scans)
    root = storage.store_root(store)
    did = dataset_id(policies, scans)
    folder = storage.join(root, "datasets", did)
    existing = read_manifest(folder)
    if existing is not None:
        return result_of(existing, folder, reused=True, warnings=warnings)

    tune_malloc()
    vocab = vocab or build_vocab(scans)
    n = sum(s["chars"] for s in scans)
    sizes = split_sizes(n, policies.val_frac, policies.test_frac)
    t0 = time.perf_counter()
    storage.makedirs(folder)
    storage.write_text_atomic(storage.join(folder, "vocab.json"), vocab.to_json())
    nonempty = [s for s in scans if s["chars"]]
    n_proc = _parallelism(sum(s["size"] for s in nonempty), len(nonempty))
    if n_proc > 1 and storage.local_path(folder) is not None:
        _encode_parallel(nonempty, policies, vocab, folder, sizes, chunk_size, n_proc)
    else:
        _encode_sequential(nonempty, policies, vocab, folder, sizes, chunk_size)
    seconds = time.perf_counter() - t0
    manifest = _manifest(did, name, policies, requested, scans, vocab, sizes)
    storage.write_text_atomic(storage.join(folder, "manifest.json"), json.dumps(manifest, indent=1))
    log.info("published dataset %s (%d chars, vocab %d) in %.1fs", did, n, len(vocab), seconds)
    return result_of(manifest, folder, reused=False, warnings=warnings)


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
        written = sum(_run_groups("_encode_group", calls, n_proc))
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


def _manifest(
    did: str,
    name: str | None,
    policies: Policies,
    requested: Sequence[str],
    scans: Sequence[dict[str, Any]],
    vocab: Vocab,
    sizes: dict[str, int],
) -> dict[str, Any]:
    n = sum(s["chars"] for s in scans)
    return {
        "format": FORMAT,
        "id": did,
        "fingerprint": did,
        "name": name,
        "created": _now(),
        "charlm_version": __version__,
        "policies": policies.to_dict(),
        "sources": {
            "requested": list(requested),
            "objects": [
                {
                    "url": s["url"],
                    "size": s["size"],
                    "version": s["version"],
                    "chars": s["chars"],
                    "sha256": s["sha256"],
                    **({"skipped": "empty"} if not s["chars"] else {}),
                }
                for s in scans
            ],
        },
        "counts": {
            "objects": len(scans),
            "objects_skipped_empty": sum(1 for s in scans if not s["chars"]),
            "bytes": sum(s["size"] for s in scans),
            "chars": n,
            "bom_stripped": sum(s["bom"] for s in scans),
            "crlf_to_lf": sum(s["crlf"] for s in scans),
            "cr_to_lf": sum(s["cr"] for s in scans),
            "invalid_replaced": sum(s["replaced"] for s in scans),
            "objects_normalized": sum(1 for s in scans if s["normalized"]),
        },
        "vocab": {"file": "vocab.json", "size": len(vocab), "dtype": vocab.dtype.name},
        "splits": {k: {"file": f"{k}.npy", "n": sizes[k]} for k in SPLITS},
    }


def result_of(
    manifest: dict[str, Any], folder: str, *, reused: bool, warnings: Sequence[str] = ()
) -> dict[str, Any]:
    """The small, JSON-able summary that ingest returns and the CLI prints."""
    return {
        "id": manifest["id"],
        "url": folder,
        "name": manifest.get("name"),
        "reused": reused,
        "chars": manifest["counts"]["chars"],
        "vocab_size": manifest["vocab"]["size"],
        "splits": {k: v["n"] for k, v in manifest["splits"].items()},
        "objects": manifest["counts"]["objects"],
        "bytes": manifest["counts"]["bytes"],
        "counts": manifest["counts"],
        "warnings": list(warnings),
    }


def ingest(
    sources: Sequence[str] | str,
    store: str | None = None,
    policies: Policies | None = None,
    *,
    name: str | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> dict[str, Any]:
    """List, scan, publish, in this process (the Prefect flow runs the same steps as tasks)."""
    policies = policies or Policies()
    srcs = [sources] if isinstance(sources, str) else list(sources)
    objects = list_sources(srcs)
    scans = scan_objects(objects, policies, chunk_size)
    return publish(scans, policies, store, name=name, requested=srcs, chunk_size=chunk_size)


# -- reporting ------------------------------------------------------------------------------------------
def summary_markdown(manifest: dict[str, Any], vocab: Vocab | None = None, *, reused: bool = False) -> str:
    """A markdown summary of a dataset: sources, sizes, vocab, top characters, policy counts."""
    c = manifest["counts"]
    lines = [
        f"# Dataset `{manifest['id'][:16]}`" + (f" ({manifest['name']})" if manifest.get("name") else ""),
        "",
        f"- id: `{manifest['id']}`" + (" (already published; reused)" if reused else ""),
        f"- created: {manifest['created']}, charlm {manifest['charlm_version']}",
        f"- {c['objects']} objects, {c['bytes']:,} bytes, {c['chars']:,} characters, "
        f"vocab {manifest['vocab']['size']} ({manifest['vocab']['dtype']})",
        "- splits: " + ", ".join(f"{k} {v['n']:,}" for k, v in manifest["splits"].items()),
        "- policies: " + ", ".join(f"{k}={v}" for k, v in manifest["policies"].items()),
        f"- policy counts: BOM stripped {c['bom_stripped']}, CRLF->LF {c['crlf_to_lf']:,}, "
        f"CR->LF {c['cr_to_lf']:,}, invalid replaced {c['invalid_replaced']:,}, "
        f"empty skipped {c['objects_skipped_empty']}, normalized objects {c['objects_normalized']}",
        "",
        "| source | bytes | chars | version |",
        "|---|---:|---:|---|",
    ]
    objs = manifest["sources"]["objects"]
    for o in objs[:50]:
        lines.append(
            f"| {o['url']} | {o['size']:,} | {o['chars']:,}{' (empty, skipped)' if o.get('skipped') else ''} "
            f"| {o['version']} |"
        )
    if len(objs) > 50:
        lines.append(f"| ... {len(objs) - 50} more | | | |")
    if vocab is not None and vocab.counts:
        total = sum(vocab.counts) or 1
        top = sorted(zip(vocab.chars, vocab.counts, strict=True), key=lambda t: -t[1])[:20]
        lines += ["", "| top characters | count | share |", "|---|---:|---:|"]
        for ch, n in top:
            shown = describe_char(ch).replace("|", "\\|")
            lines.append(f"| {shown} | {n:,} | {100 * n / total:.2f}% |")
    return "\n".join(lines) + "\n"


def dataset_summary(folder: str, *, reused: bool = False) -> str:
    """summary_markdown for a published dataset folder (reads manifest.json and vocab.json)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise IngestError(f"{folder}: no manifest.json (not a published dataset)")
    vocab = Vocab.from_json(storage.read_bytes(storage.join(folder, manifest["vocab"]["file"])))
    return summary_markdown(manifest, vocab, reused=reused)
