"""The `charlm visualize` page of a registered version, logged as an artifact of the run that
produced it (so it sits beside the version's model in MLflow), on a dataset's held-out text."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from charlm.tracking.registry import load_checkpoint_ref, validate_model_name
from charlm.tracking.session import TrackingSession

ARTIFACT_DIR = "visualize"
PAGE_CHARS = 10_000


def log_version_page(
    name: str,
    version: int,
    dataset: str,
    *,
    split: str = "test",
    max_chars: int = PAGE_CHARS,
    tracking_uri: str | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """Visualize version `version` of `name` on the first max_chars characters of the dataset's
    split (characters its vocabulary lacks left out), and log the page to the version's run under
    visualize/. Returns where it went and each feature's best cell."""
    from charlm import __version__, checkpoint, visualize, visualize_html
    from charlm.datasets import open_dataset

    validate_model_name(name)
    s = TrackingSession.open(tracking_uri, store)
    mv = s.client.get_model_version(name, str(version))
    ck, label = load_checkpoint_ref(f"models:/{name}/{version}", tracking_uri=s.uri, store=store)
    model, vocab, ck = checkpoint.load_model(ck, name=label)
    ds = open_dataset(dataset, store)
    text = ds.vocab.decode(ds.splits[split][: max_chars * 2])
    kept = "".join(c for c in text if c in vocab)[:max_chars]
    if len(kept) < 2:
        raise ValueError(f"dataset {ds.id}: its {split} split has no text model {name} v{version} can read")
    an = visualize.analyze(model, vocab.encode(kept), kept)
    cfg = model.config
    meta = {
        "model": f"models:/{name}/{version}",
        "step": ck.get("step"),
        "dataset": ds.id,
        "architecture": f"{cfg.num_layers}x{cfg.hidden_size} {cfg.cell}",
        "text": f"{split} split of dataset {ds.id}",
        "characters": len(kept),
        "charlm": __version__,
    }
    file = f"{name}-v{version}.html"
    with tempfile.TemporaryDirectory(prefix="charlm-visualize-") as tmp:
        visualize_html.write(Path(tmp) / file, visualize_html.render(an, meta, vocab.chars))
        s.client.log_artifact(mv.run_id, str(Path(tmp) / file), ARTIFACT_DIR)
    run = s.client.get_run(mv.run_id)
    summary = an.summary()
    return {
        "version": int(version),
        "run_id": mv.run_id,
        "artifact_path": f"{ARTIFACT_DIR}/{file}",
        "artifact_uri": f"{run.info.artifact_uri}/{ARTIFACT_DIR}/{file}",
        "chars": len(kept),
        "best_cells": {k: (f["best"][0] if f["best"] else None) for k, f in summary["features"].items()},
    }
