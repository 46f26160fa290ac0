"""What the workers train on: a published dataset every rank reads from the store, or a raw corpus
the driver encodes once and ships through Ray's object store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from charlm.config import TrainConfig
from charlm.refs import DataRef


@dataclass(frozen=True)
class DataSpec:
    """What the workers train on: a published dataset (read by every rank from the store) or a
    raw corpus the driver encoded ('inline', shipped through Ray's object store)."""

    kind: str  # "dataset" | "inline"
    url: str | None  # the dataset folder (kind == "dataset")
    id: str  # dataset id, or the corpus fingerprint for a raw corpus
    fingerprint: str
    label: str
    vocab_size: int


def resolve_data(data_ref: str | DataRef, cfg: TrainConfig, store: str | None = None) -> tuple[DataSpec, Any]:
    """(spec, payload): payload is None for a dataset, else (vocab dict, splits) to ship."""
    from charlm.refs import DatasetRef
    from charlm.refs import resolve_data as resolve_ref

    ref = resolve_ref(data_ref, store)
    if isinstance(ref, DatasetRef):
        m = ref.manifest
        return DataSpec("dataset", ref.url, ref.id, ref.fingerprint, ref.label, int(m["vocab"]["size"])), None
    # A raw corpus (file, folder, builtin): encoded once here with the same rules as `charlm train`.
    from charlm.trainingdata import load_training_data

    vocab, splits, fp, label = load_training_data(ref, cfg.val_frac, cfg.test_frac, store)
    spec = DataSpec("inline", None, fp, fp, label, len(vocab))
    return spec, (vocab.to_dict(), {k: v for k, v in splits.items()})


def load_worker_data(spec: dict[str, Any], payload_ref: Any):
    from charlm.vocab import Vocab

    if spec["kind"] == "dataset":
        from charlm import datasets

        ds = datasets.load(spec["url"])
        return ds.vocab, ds.splits, ds.fingerprint, spec["label"]
    import ray

    vocab_d, splits = ray.get(payload_ref)
    return Vocab.from_dict(vocab_d), splits, spec["fingerprint"], spec["label"]
