"""Character vocabulary: Unicode code points, ordered by code point, with counts.

The order is deterministic (sorted by code point), so the same character set always maps to the
same ids whatever order the text arrived in. Encoding is vectorised through numpy (UTF-32 view +
searchsorted), so a 1 GB corpus encodes at memory speed instead of a Python dict lookup per char.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np


class UnknownCharactersError(ValueError):
    """Text holds characters the vocabulary does not know."""

    def __init__(self, unknown: Mapping[str, int], where: str = "text") -> None:
        self.unknown = dict(unknown)
        listed = ", ".join(f"{describe_char(c)} x{n}" for c, n in sorted(self.unknown.items())[:20])
        more = "" if len(self.unknown) <= 20 else f" and {len(self.unknown) - 20} more"
        super().__init__(
            f"{where} has {len(self.unknown)} character(s) outside the vocabulary: {listed}{more}"
        )


def describe_char(c: str) -> str:
    """'a' (U+0061): printable form plus code point, for error messages."""
    shown = c if c.isprintable() and not c.isspace() else repr(c)[1:-1]
    return f"'{shown}' (U+{ord(c):04X})"


def dtype_for(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds ids 0..vocab_size-1."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _codepoints(text: str) -> np.ndarray:
    # UTF-32-LE without BOM is exactly one uint32 code point per character.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


@dataclass(frozen=True)
class Vocab:
    """Characters sorted by code point; id i is chars[i]. counts[i] is its corpus frequency."""

    chars: tuple[str, ...]
    counts: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        cps = [ord(c) for c in self.chars]
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("vocab entries must be single characters")
        if cps != sorted(set(cps)):
            raise ValueError("vocab characters must be unique and sorted by code point")
        if self.counts and len(self.counts) != len(self.chars):
            raise ValueError("vocab counts must match characters one to one")
        if not self.chars:
            raise ValueError("vocab is empty")
        object.__setattr__(self, "_cps", np.asarray(cps, dtype=np.uint32))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> Vocab:
        items = sorted((c, int(n)) for c, n in counts.items() if n > 0)
        return cls(tuple(c for c, _ in items), tuple(n for _, n in items))

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> Vocab:
        counts: Counter[str] = Counter()
        for chunk in [text] if isinstance(text, str) else text:
            counts.update(chunk)
        return cls.from_counts(counts)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able: code points (not chars) so surrogates/controls survive any JSON writer."""
        return {"codepoints": [ord(c) for c in self.chars], "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Vocab:
        try:
            return cls(
                tuple(chr(int(cp)) for cp in d["codepoints"]), tuple(int(n) for n in d.get("counts", ()))
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a charlm vocabulary: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str | bytes) -> Vocab:
        return cls.from_dict(json.loads(s))

    # -- use -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.chars)

    @property
    def size(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        return dtype_for(len(self.chars))

    def __contains__(self, c: object) -> bool:
        return isinstance(c, str) and len(c) == 1 and self.index(c) is not None

    def index(self, c: str) -> int | None:
        i = int(np.searchsorted(self._cps, ord(c)))
        return i if i < len(self.chars) and self.chars[i] == c else None

    def unknown(self, text: str) -> dict[str, int]:
        """Characters of text not in the vocab, with how often each occurs."""
        cps = _codepoints(text)
        idx = np.searchsorted(self._cps, cps).clip(0, len(self.chars) - 1)
        bad = cps[self._cps[idx] != cps]
        if bad.size == 0:
            return {}
        values, n = np.unique(bad, return_counts=True)
        return {chr(int(v)): int(k) for v, k in zip(values, n, strict=True)}

    def encode(self, text: str, where: str = "text") -> np.ndarray:
        """Ids of text as the vocab's compact dtype; UnknownCharactersError names any stranger."""
        cps = _codepoints(text)
        idx = np.searchsorted(self._cps, cps).clip(0, len(self.chars) - 1)
        if not np.array_equal(self._cps[idx], cps):
            raise UnknownCharactersError(self.unknown(text), where)
        return idx.astype(self.dtype, copy=False)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.chars)):
            raise ValueError(f"ids outside 0..{len(self.chars) - 1}")
        return self._cps[arr].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
