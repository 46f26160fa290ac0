"""Published datasets in a store: find, open and list them.

A dataset is the folder ``<store>/datasets/<id>/`` with ``manifest.json`` (written last),
``vocab.json`` and ``train.npy``, ``val.npy``, ``test.npy``. A folder without a manifest is an
unpublished (in-progress or crashed) ingest and is treated as absent.

References accepted by :func:`open_dataset`, in this order:

1. the URL or path of a dataset folder (one holding ``manifest.json``);
2. a dataset id, or a unique prefix of at least 6 hex digits, in the store;
3. anything that exists as a path/object/prefix is not a dataset reference: ``None`` is
   returned so the caller can read it as a raw corpus;
4. the ``name`` given at ingest time: the most recent dataset with that name.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from charlm import storage
from charlm.ingest.format import FORMAT, SPLITS, read_manifest
from charlm.vocab import Vocab

_HEX = re.compile(r"^[0-9a-f]{6,64}$")
MIN_PREFIX = 6


class DatasetError(ValueError):
    """A dataset reference that cannot be used; the message says which and why."""


class DatasetNotFoundError(DatasetError):
    pass


@dataclass
class Dataset:
    id: str
    url: str
    vocab: Vocab
    splits: dict[str, np.ndarray]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def name(self) -> str | None:
        return self.manifest.get("name")


def _datasets_root(store: str | None) -> str:
    return storage.Store.at(store).datasets()


def _load_split(folder: str, name: str, entry: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    url = storage.join(folder, entry.get("file", f"{name}.npy"))
    try:
        lp = storage.local_path(url)
        if lp is not None:
            arr = np.load(lp, mmap_mode="r", allow_pickle=False)
        else:
            arr = np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
    except (storage.ObjectNotFoundError, FileNotFoundError):
        raise DatasetError(f"{url}: split file missing from a published dataset") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{url}: unreadable split ({e})") from None
    if arr.ndim != 1 or arr.dtype != dtype or len(arr) != int(entry["n"]):
        raise DatasetError(
            f"{url}: expected {entry['n']} ids of {dtype.name}, found shape {arr.shape} of {arr.dtype}"
        )
    return arr


def load(folder: str, manifest: dict[str, Any] | None = None) -> Dataset:
    """Open the dataset in a folder; DatasetError if it is not a complete, consistent dataset."""
    folder = storage.normalize_url(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is None:
        raise DatasetNotFoundError(f"{folder}: no manifest.json (not a published dataset)")
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{folder}: unsupported dataset format {manifest.get('format')!r} (want {FORMAT})")
    try:
        vocab = Vocab.from_json(storage.read_bytes(storage.join(folder, manifest["vocab"]["file"])))
        did = str(manifest["id"])
        splits = {k: _load_split(folder, k, manifest["splits"][k], vocab.dtype) for k in SPLITS}
    except storage.ObjectNotFoundError as e:
        raise DatasetError(f"{folder}: incomplete dataset ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{folder}: broken dataset ({type(e).__name__}: {e})") from None
    if len(vocab) != manifest["vocab"]["size"]:
        raise DatasetError(
            f"{folder}: vocab.json has {len(vocab)} characters, manifest says {manifest['vocab']['size']}"
        )
    return Dataset(id=did, url=folder, vocab=vocab, splits=splits, manifest=manifest)


def _published(store: str | None) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for folder in storage.ls(_datasets_root(store)):
        if storage.basename(folder).startswith("."):
            continue
        m = read_manifest(folder)
        if m is not None:
            out.append((folder, m))
    return out


def resolve(ref: str, store: str | None = None) -> str | None:
    """The folder URL of the dataset ref names, or None if ref is not a dataset reference."""
    ref = ref.strip()
    if not ref:
        return None
    looks_like_path = "/" in ref or "://" in ref or ref.startswith((".", "~"))
    if looks_like_path and storage.exists(storage.join(ref, "manifest.json")):
        return storage.normalize_url(ref)
    root = _datasets_root(store)
    if _HEX.match(ref):
        if len(ref) == 64 and storage.exists(storage.join(root, ref, "manifest.json")):
            return storage.join(root, ref)
        hits = [f for f in storage.ls(root) if storage.basename(f).startswith(ref)]
        hits = [f for f in hits if storage.exists(storage.join(f, "manifest.json"))]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            ids = ", ".join(storage.basename(h)[:12] for h in hits[:5])
            raise DatasetError(f"dataset id prefix {ref!r} is ambiguous in {root}: {ids}")
    if storage.exists(ref):
        if looks_like_path and storage.isdir(ref) and _looks_unpublished(ref):
            raise DatasetNotFoundError(
                f"{ref}: dataset folder without manifest.json (unpublished or crashed ingest)"
            )
        return None
    if _HEX.match(ref):
        raise DatasetNotFoundError(f"no dataset {ref!r} in {root} and no such file")
    named = [(m.get("created", ""), f) for f, m in _published(store) if m.get("name") == ref]
    if named:
        return max(named)[1]
    return None


def _looks_unpublished(folder: str) -> bool:
    names = {storage.basename(u) for u in storage.ls(folder)}
    return "vocab.json" in names or "train.npy" in names


def open_dataset(ref: str, store: str | None = None) -> Dataset | None:
    """A published dataset by id, id prefix, folder URL or name; None if ref is not one (see module doc)."""
    folder = resolve(ref, store)
    return None if folder is None else load(folder)


def list_datasets(store: str | None = None) -> list[dict[str, Any]]:
    """Summaries of the published datasets in a store, oldest first."""
    out = []
    for folder, m in _published(store):
        try:
            out.append(
                {
                    "id": m["id"],
                    "name": m.get("name"),
                    "created": m.get("created"),
                    "url": folder,
                    "objects": m["counts"]["objects"],
                    "bytes": m["counts"]["bytes"],
                    "chars": m["counts"]["chars"],
                    "vocab_size": m["vocab"]["size"],
                    "sources": m["sources"]["requested"],
                }
            )
        except (KeyError, TypeError):
            out.append({"id": storage.basename(folder), "url": folder, "error": "unreadable manifest"})
    out.sort(key=lambda d: (d.get("created") or "", d["id"]))
    return out


def show(ref: str, store: str | None = None) -> dict[str, Any]:
    """The manifest of one dataset (DatasetNotFoundError if ref names none)."""
    folder = resolve(ref, store)
    if folder is None:
        raise DatasetNotFoundError(f"{ref}: not a dataset in {storage.store_root(store)}")
    m = read_manifest(folder)
    if m is None:
        raise DatasetNotFoundError(f"{folder}: no manifest.json")
    return {**m, "url": folder}


def manifest_json(m: dict[str, Any]) -> str:
    return json.dumps(m, indent=1)
