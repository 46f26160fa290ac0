"""Every string a user gives for training data or a model, turned once, at the edge (the CLI or a
flow's entry), into a typed reference that the layers below take as it is.

Training data (`resolve_data`):
- `CorpusRef`: raw text: the embedded default corpus (`builtin:python-stdlib`) or a local file or
  folder, encoded by whoever trains on it;
- `DatasetRef`: a published dataset in the store, with its manifest read once here. Written as its
  folder URL or path, its full id, `id:PREFIX`, a bare id prefix of 6+ hex digits, `NAME` (the
  newest dataset of that name: the reference's `note` says so when there are several) or `NAME@N`
  (the N-th of that name, oldest first). See charlm.datasets.locate for the rules that keep names
  and ids apart.

Models (`resolve_model`):
- `RegistryRef`: `models:/NAME/VERSION`, `models:/NAME/latest` or `models:/NAME@ALIAS`;
- `MlflowRunRef`: `runs:/RUN_ID/PATH`;
- `CheckpointRef`: a checkpoint file (path or URL), found for a run folder (path or URL) or the
  bare name of a run in `<store>/runs/` by charlm.runs.find_checkpoint.

Resolving needs no MLflow and no Ray; reading a dataset reference needs the storage extra. Loading
a model from a reference is `load_checkpoint` here for files and charlm.tracking for the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charlm.corpus import DEFAULT_CORPUS


class RefError(ValueError):
    """A string that names no corpus, dataset or model; the message names the string."""


# -- training data ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusRef:
    """Raw text: DEFAULT_CORPUS or a local file or folder."""

    path: str

    @property
    def label(self) -> str:
        return self.path

    @property
    def given(self) -> str:
        return self.path

    @property
    def is_builtin(self) -> bool:
        return self.path == DEFAULT_CORPUS


@dataclass(frozen=True)
class DatasetRef:
    """A published dataset: its id, its folder URL and its manifest (read once, when resolved)."""

    id: str
    url: str
    manifest: dict[str, Any] = field(compare=False, hash=False, repr=False)
    given: str = ""  # the string it was resolved from
    note: str | None = None  # what a user should know about the choice (newest of several, ...)

    @property
    def label(self) -> str:
        return f"dataset {self.id}"

    @property
    def name(self) -> str | None:
        n = self.manifest.get("name")
        return str(n) if n else None

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("fingerprint") or self.id)


DataRef = CorpusRef | DatasetRef


def resolve_data(ref: str | DataRef, store: str | None = None) -> DataRef:
    """The typed reference for a corpus argument (already typed ones pass through).

    Order: the builtin corpus; a dataset folder, id, `id:PREFIX`, name or `NAME@N`; an existing
    local file or folder (raw text); else an error naming the string."""
    if isinstance(ref, CorpusRef | DatasetRef):
        return ref
    given = str(ref).strip()
    if not given:
        raise RefError("corpus: an empty string names no corpus or dataset")
    if given == DEFAULT_CORPUS:
        return CorpusRef(given)
    try:
        from charlm import datasets
    except ImportError:  # no storage extra: only raw local corpora
        datasets = None  # type: ignore[assignment]
    if datasets is not None:
        found = datasets.locate(given, store)
        if found is not None:
            return DatasetRef(
                id=str(found.manifest["id"]),
                url=found.url,
                manifest=found.manifest,
                given=given,
                note=found.note,
            )
    if Path(given).expanduser().exists():
        return CorpusRef(given)
    where = f" in {datasets.datasets_root(store)}" if datasets is not None else ""
    raise RefError(f"{given}: not a file, folder, dataset id, dataset name or dataset URL{where}")


# -- models -------------------------------------------------------------------------------------
_MODELS_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[^/@]+))/?$")


@dataclass(frozen=True)
class RegistryRef:
    """A registered model version: by number, the latest, or an alias."""

    name: str
    version: int | None = None  # None with alias None: the latest version
    alias: str | None = None

    @property
    def uri(self) -> str:
        if self.alias:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}/{self.version if self.version is not None else 'latest'}"

    @property
    def label(self) -> str:
        return self.uri


@dataclass(frozen=True)
class MlflowRunRef:
    """An artifact of an MLflow run: runs:/RUN_ID/PATH."""

    uri: str

    @property
    def label(self) -> str:
        return self.uri


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint file (local path or store URL); `run` is the run folder it was found in."""

    url: str
    run: str | None = None

    @property
    def label(self) -> str:
        return self.url


ModelRef = RegistryRef | MlflowRunRef | CheckpointRef


def parse_models_uri(ref: str) -> RegistryRef:
    """RegistryRef of 'models:/NAME/VERSION', 'models:/NAME/latest' or 'models:/NAME@ALIAS'."""
    m = _MODELS_REF.match(ref.strip())
    if not m:
        raise RefError(f"{ref}: not a model reference (want models:/NAME/VERSION or models:/NAME@ALIAS)")
    v = m.group("version")
    return RegistryRef(m.group("name"), int(v) if v and v != "latest" else None, m.group("alias"))


def resolve_model(ref: str | ModelRef, store: str | None = None, which: str = "best") -> ModelRef:
    """The typed reference for a model argument (already typed ones pass through).

    A run folder or run name becomes the CheckpointRef of its best (which="best") or last
    checkpoint, as charlm.runs.find_checkpoint picks it."""
    if isinstance(ref, RegistryRef | MlflowRunRef | CheckpointRef):
        return ref
    given = str(ref).strip()
    if not given:
        raise RefError("model: an empty string names no model")
    if given.startswith("models:/"):
        return parse_models_uri(given)
    if given.startswith("runs:/"):
        return MlflowRunRef(given)
    from charlm import runs

    local = Path(given).expanduser()
    if "://" not in given and local.is_file():
        return CheckpointRef(str(local))
    if "://" not in given and local.is_dir():
        for name in runs.PUBLISHED[which]:
            if (local / name).is_file():
                return CheckpointRef(str(local / name), run=str(local))
    if "://" not in given and "/" in given and not local.exists():
        raise RefError(f"{given}: no such checkpoint file")  # a path, so not a run name either
    if "://" in given and given.endswith(".pt"):  # a file's URL: reading it says if it is missing
        from charlm import storage

        return CheckpointRef(storage.normalize_url(given))
    try:
        url = runs.find_checkpoint(given, which, store)
    except ModuleNotFoundError:  # no storage extra: store URLs and Ray's folders cannot be read
        if local.is_dir():
            raise RefError(f"{given}: folder holds no best.pt or last.pt checkpoint") from None
        raise RefError(f"{given}: no such checkpoint file or run folder") from None
    from charlm import storage

    return CheckpointRef(url, run=None if url == storage.normalize_url(given) else given)


def load_checkpoint(ref: CheckpointRef) -> dict[str, Any]:
    """The validated checkpoint dict of a file reference (local file directly, a URL as bytes)."""
    from charlm import runs

    return runs.read_checkpoint_file(ref.url)
