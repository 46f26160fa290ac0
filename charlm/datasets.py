"""Published datasets in a store: find, open and list them.

A dataset is the folder ``<store>/datasets/<id>/`` with ``manifest.json`` (written last),
``vocab.json`` and ``train.npy``, ``val.npy``, ``test.npy``. A folder without a manifest is an
unpublished (in-progress or crashed) ingest and is treated as absent.

References accepted by :func:`locate` (and so by :func:`open_dataset`), in this order:

1. ``id:PREFIX``: only ever an id (full, or a unique prefix of 6+ hex digits);
2. the URL or path of a dataset folder (one holding ``manifest.json``);
3. ``NAME@N``: the N-th dataset published under NAME, oldest first;
4. a full id, or a bare prefix of 6+ hex digits; one that is also a dataset's name is refused
   with both candidates listed (names that look like ids are refused at ingest since);
5. anything that exists as a path/object/prefix is not a dataset reference: ``None`` is
   returned so the caller can read it as a raw corpus;
6. the ``name`` given at ingest time: the newest dataset of that name (the result's note says
   so when there are several).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from charlm import storage
from charlm.ingest.format import FORMAT, ID_PREFIX, SPLITS, read_manifest
from charlm.vocab import Vocab

_HEX = ID_PREFIX
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


def datasets_root(store: str | None) -> str:
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
    for folder in storage.ls(datasets_root(store)):
        if storage.basename(folder).startswith("."):
            continue
        m = read_manifest(folder)
        if m is not None:
            out.append((folder, m))
    return out


@dataclass(frozen=True)
class Located:
    """A published dataset a reference names: its folder, its manifest, and what a user should
    know about the choice (None when there was no choice)."""

    url: str
    manifest: dict[str, Any] = field(repr=False)
    note: str | None = None


def _by_name(store: str | None, name: str) -> list[tuple[str, dict[str, Any]]]:
    """The datasets published under `name`, oldest first (version N is the N-th)."""
    named = [(f, m) for f, m in _published(store) if m.get("name") == name]
    return sorted(named, key=lambda fm: (str(fm[1].get("created", "")), str(fm[1]["id"])))


def _by_prefix(root: str, prefix: str) -> list[str]:
    hits = [f for f in storage.ls(root) if storage.basename(f).startswith(prefix)]
    return [f for f in hits if storage.exists(storage.join(f, "manifest.json"))]


def _located(folder: str, note: str | None = None) -> Located:
    m = read_manifest(folder)
    if m is None:
        raise DatasetNotFoundError(f"{folder}: no manifest.json")
    return Located(folder, m, note)


def _named(store: str | None, ref: str, named: list[tuple[str, dict[str, Any]]]) -> Located:
    """The newest of a name's datasets; the note says so when there are several."""
    folder, m = named[-1]
    note = None
    if len(named) > 1:
        note = (
            f"dataset {ref}: the newest of {len(named)} datasets of that name ({ref}@{len(named)}, "
            f"id {str(m['id'])[:12]}, created {m.get('created')}); {ref}@1..{ref}@{len(named)} or an id picks another"
        )
    return Located(folder, m, note)


def locate(ref: str, store: str | None = None) -> Located | None:
    """The published dataset `ref` names, or None if ref is not a dataset reference.

    Rules (charlm.refs documents the forms): `id:PREFIX` is only ever an id; `NAME@N` only a
    name's N-th version; a bare string of 6+ hex digits that is both a name and an id prefix is
    refused with the candidates listed, never silently read as one of them."""
    ref = ref.strip()
    if not ref:
        return None
    root = datasets_root(store)
    if ref.startswith("id:"):
        prefix = ref[3:]
        if not _HEX.match(prefix):
            raise DatasetError(f"{ref}: an id prefix is 6 to 64 hex digits")
        hits = _by_prefix(root, prefix)
        if not hits:
            raise DatasetNotFoundError(f"{ref}: no dataset id starts with {prefix} in {root}")
        if len(hits) > 1:
            ids = ", ".join(storage.basename(h)[:12] for h in hits[:5])
            raise DatasetError(f"{ref}: ambiguous id prefix in {root}: {ids}")
        return _located(hits[0])
    looks_like_path = "/" in ref or "://" in ref or ref.startswith((".", "~"))
    if looks_like_path and storage.exists(storage.join(ref, "manifest.json")):
        return _located(storage.normalize_url(ref))
    m = re.fullmatch(r"(?P<name>[^/@:]+)@(?P<n>\d+)", ref)
    if m:
        named = _by_name(store, m["name"])
        if named:
            n = int(m["n"])
            if not 1 <= n <= len(named):
                raise DatasetNotFoundError(
                    f"{ref}: dataset {m['name']} has versions 1..{len(named)} in {root} (oldest first)"
                )
            return Located(*named[n - 1])
    if _HEX.match(ref):
        if len(ref) == 64 and storage.exists(storage.join(root, ref, "manifest.json")):
            return _located(storage.join(root, ref))
        hits = _by_prefix(root, ref)
        named = _by_name(store, ref)
        if hits and named:
            cands = ", ".join([f"id:{storage.basename(h)[:12]}" for h in hits[:5]] + [f"{ref}@{len(named)}"])
            raise DatasetError(
                f"{ref}: is both a dataset name and an id prefix in {root}; say which: {cands}"
            )
        if len(hits) > 1:
            ids = ", ".join(storage.basename(h)[:12] for h in hits[:5])
            raise DatasetError(f"dataset id prefix {ref!r} is ambiguous in {root}: {ids}")
        if hits:
            return _located(hits[0])
        if named:
            return _named(store, ref, named)
    if storage.exists(ref):
        if looks_like_path and storage.isdir(ref) and _looks_unpublished(ref):
            raise DatasetNotFoundError(
                f"{ref}: dataset folder without manifest.json (unpublished or crashed ingest)"
            )
        return None
    if _HEX.match(ref):
        raise DatasetNotFoundError(f"no dataset {ref!r} in {root} and no such file")
    named = _by_name(store, ref)
    return _named(store, ref, named) if named else None


def resolve(ref: str, store: str | None = None) -> str | None:
    """The folder URL of the dataset ref names, or None if ref is not a dataset reference."""
    found = locate(ref, store)
    return None if found is None else found.url


def _looks_unpublished(folder: str) -> bool:
    names = {storage.basename(u) for u in storage.ls(folder)}
    return "vocab.json" in names or "train.npy" in names


def open_dataset(ref: str, store: str | None = None) -> Dataset | None:
    """A published dataset by any reference `locate` takes; None if ref is not one."""
    found = locate(ref, store)
    return None if found is None else load(found.url, found.manifest)


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
    counts: dict[str, int] = {}
    for d in out:  # the N of NAME@N: each name's datasets numbered oldest first
        if d.get("name"):
            counts[d["name"]] = d["version"] = counts.get(d["name"], 0) + 1
    return out


def show(ref: str, store: str | None = None) -> dict[str, Any]:
    """The manifest of one dataset (DatasetNotFoundError if ref names none)."""
    found = locate(ref, store)
    if found is None:
        raise DatasetNotFoundError(f"{ref}: not a dataset in {storage.store_root(store)}")
    return {**found.manifest, "url": found.url, **({"note": found.note} if found.note else {})}


def manifest_json(m: dict[str, Any]) -> str:
    return json.dumps(m, indent=1)
