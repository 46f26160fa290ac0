"""The published dataset format, shared by the writer (charlm.ingest) and the reader
(charlm.datasets): the format tag, the splits, the manifest. The splits' sizes are
charlm.data.split_sizes, the arithmetic training uses on a raw corpus too.

A dataset is the folder ``<store>/datasets/<id>/`` with ``vocab.json``, one ``<split>.npy`` per
split and ``manifest.json``, written last (docs/ingest.md). This module imports nothing of the
writer's.
"""

from __future__ import annotations

import json
import re
from typing import Any

from charlm import storage
from charlm.ingest.errors import IngestError

FORMAT = "charlm-dataset/1"
SPLITS = ("train", "val", "test")
ID_PREFIX = re.compile(r"^[0-9a-f]{6,64}$")  # what reads as a dataset id or a prefix of one


def validate_name(name: str) -> str:
    """A dataset name that can never be read as anything else (charlm.datasets.locate): not
    empty, no '/', '@' or ':', and not 6+ hex digits, which would read as an id prefix."""
    if not name or name != name.strip():
        raise IngestError(f"dataset name {name!r}: must be non-empty, without surrounding spaces")
    if any(c in name for c in "/@:"):
        raise IngestError(
            f"dataset name {name!r}: may not hold '/', '@' or ':' (they mark URLs and versions)"
        )
    if ID_PREFIX.match(name):
        raise IngestError(
            f"dataset name {name!r}: reads as a dataset id prefix (6+ hex digits); choose a name with another letter"
        )
    return name


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
