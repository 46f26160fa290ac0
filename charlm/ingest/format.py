"""The published dataset format, shared by the writer (charlm.ingest) and the reader
(charlm.datasets): the format tag, the splits, the manifest. The splits' sizes are
charlm.data.split_sizes, the arithmetic training uses on a raw corpus too.

A dataset is the folder ``<store>/datasets/<id>/`` with ``vocab.json``, one ``<split>.npy`` per
split and ``manifest.json``, written last (docs/ingest.md). This module imports nothing of the
writer's.
"""

from __future__ import annotations

import json
from typing import Any

from charlm import storage
from charlm.ingest.errors import IngestError

FORMAT = "charlm-dataset/1"
SPLITS = ("train", "val", "test")


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
