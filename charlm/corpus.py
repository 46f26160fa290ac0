"""Local raw corpora and the embedded default corpus.

The embedded default is the Python standard library's own source code, which exists on every
machine with Python and was not written by us (the post's Linux-source experiment, in Python).
Object-store corpora go through `charlm ingest` instead (charlm.ingest).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

DEFAULT_CORPUS = "builtin:python-stdlib"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


class CorpusError(ValueError):
    pass


def stdlib_files(max_chars: int | None = 2_000_000) -> list[Path]:
    """The standard library's .py files in sorted path order, up to about max_chars characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    out, total = [], 0
    for f in files:
        size = f.stat().st_size
        if max_chars is not None and total + size > max_chars and out:
            continue  # keep scanning: smaller later files may still fit
        out.append(f)
        total += size
    return out


def default_corpus_text(max_chars: int | None = 2_000_000) -> str:
    parts = []
    for f in stdlib_files(max_chars):
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue  # a vendor-patched file with another encoding is simply left out
    return normalize_newlines("\n\n".join(parts))


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR -> LF, the ingest default (a '\\r' in the vocab only hurts sampling)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode_utf8(data: bytes, name: str) -> str:
    """Strict UTF-8 with a BOM stripped; errors name the file and the byte offset."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{name}: invalid UTF-8 at byte offset {e.start} ({data[e.start : e.start + 4]!r}); "
            "ingest it with `charlm ingest --invalid replace` to substitute U+FFFD"
        ) from None
    if "\x00" in text:
        raise CorpusError(f"{name}: contains NUL bytes; it looks like a binary file, not text")
    return text.removeprefix("\ufeff")


def read_local_corpus(path: str | os.PathLike) -> str:
    """A text file, or every file under a folder in sorted order, decoded and newline-normalised."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"{p}: no such file or folder")
    files = (
        sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
    )
    texts = [decode_utf8(f.read_bytes(), str(f)) for f in files]
    text = normalize_newlines("".join(texts))
    if not text:
        raise CorpusError(f"{p}: corpus is empty")
    return text
