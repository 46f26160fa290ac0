"""What a run records about where it came from: the training data (a published dataset's id,
URL, manifest and sources, or a raw corpus's label) and charlm's git commit."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from charlm.refs import DataRef, DatasetRef, resolve_data
from charlm.tracking.redact import _clip, redact


@dataclass
class DatasetInfo:
    """What a run records about its training data. For a published dataset: id, URL and manifest
    (-> source objects); for a raw corpus only its label (the fingerprint arrives with the summary)."""

    label: str
    id: str | None = None
    url: str | None = None
    fingerprint: str | None = None
    manifest: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def sources(self) -> list[str]:
        if not self.manifest:
            return []
        return [str(s) for s in self.manifest.get("sources", {}).get("requested", [])]


def describe_dataset(corpus: str | DataRef, store: str | None = None) -> DatasetInfo:
    """DatasetInfo for a training corpus reference (a string is resolved by charlm.refs)."""
    ref = resolve_data(corpus, store)
    if not isinstance(ref, DatasetRef):
        return DatasetInfo(label=ref.label)
    return DatasetInfo(
        label=ref.label, id=ref.id, url=ref.url, fingerprint=ref.fingerprint, manifest=ref.manifest
    )


def _dataset_tags(ds: DatasetInfo) -> dict[str, str]:
    tags = {"corpus": ds.label}
    if ds.id:
        tags["dataset_id"] = ds.id
        tags["dataset_url"] = ds.url or ""
        if ds.manifest and ds.manifest.get("name"):
            tags["dataset_name"] = str(ds.manifest["name"])
    if ds.fingerprint:
        tags["dataset_fingerprint"] = ds.fingerprint
    if ds.sources:
        tags["source_urls"] = "\n".join(ds.sources)
    return tags


def _log_dataset_input(client: MlflowClient, run_id: str, ds: DatasetInfo) -> None:
    """The dataset as an MLflow run input, so the UI shows it with its source."""
    from mlflow.entities import Dataset as MlflowDataset
    from mlflow.entities import DatasetInput, InputTag

    source = json.dumps({"url": redact(ds.url or ""), "sources": [redact(s) for s in ds.sources]})
    entity = MlflowDataset(
        name=_clip(str((ds.manifest or {}).get("name") or ds.id), 200),
        digest=(ds.id or "")[:32],
        source_type="charlm-dataset",
        source=_clip(source, 5000),
    )
    client.log_inputs(
        run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])]
    )


def git_commit() -> str | None:
    """The commit of charlm's source tree when it is a git checkout ($CHARLM_GIT_COMMIT wins)."""
    env = os.environ.get("CHARLM_GIT_COMMIT")
    if env:
        return env
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None
