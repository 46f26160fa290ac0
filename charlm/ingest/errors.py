"""The errors of ingestion: each one line, naming the object and the problem."""

from __future__ import annotations

from typing import Any


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
