"""UTF-8 text under the text policies: decoding, policies, and streaming objects' bytes.

TextStream turns one object's bytes into the UTF-8 of its normalized text, chunk by chunk;
iter_utf8 and iter_text read an object through it; _object_data fetches small objects many at a
time. The policies are stated in the package docstring (charlm/ingest/__init__.py) and
docs/ingest.md.
"""

from __future__ import annotations

import codecs
import functools
import queue
import threading
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from charlm import storage
from charlm.ingest.errors import BinaryObjectError, InvalidUTF8Error, SourceChangedError
from charlm.storage import ObjectInfo

CHUNK_SIZE = 1 << 20  # measured best of 1, 2, 4 MiB (cache-sized temporaries)
NEWLINES = ("lf", "keep")
INVALID = ("strict", "replace")
NORMAL_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
SNIFF_BYTES = 8192
BINARY_CONTROL_FRAC = 0.10
_NORM_TAIL_LIMIT = 4 << 20
SMALL_OBJECT = 1 << 20  # objects up to this size are fetched whole, many at a time
GROUP_BYTES = 32 << 20
GROUP_OBJECTS = 256

_CONTROL_BYTES = bytes(c for c in range(32) if c not in (9, 10, 11, 12, 13, 27)) + b"\x7f"
_NON_CONTROL = bytes(c for c in range(256) if c not in _CONTROL_BYTES)
_ASCII_BYTES = bytes(range(128))


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
