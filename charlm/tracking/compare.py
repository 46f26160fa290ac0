"""Comparing registered versions on one held-out split (the scoring itself is charlm.scoring),
and recording a promotion decision (flows/evaluate.py)."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from mlflow.entities import Metric

from charlm import storage
from charlm.errors import first_line
from charlm.tracking.redact import _str, redact
from charlm.tracking.registry import (
    CHAMPION,
    _all_versions,
    _checkpoint_in,
    _download_model_dir,
    _float_or_none,
    _registered_model,
    _resolve_version,
    _version_info,
    validate_model_name,
)
from charlm.tracking.session import TrackingError, TrackingSession, _log_batch, _log_json, ensure_experiment

EVALUATION_EXPERIMENT = "charlm-evaluations"


def compare_versions(
    name: str,
    versions: Sequence[str | int] | None = None,
    *,
    dataset: str | None = None,
    split: str = "test",
    max_chars: int | None = None,
    batch_size: int = 16,
    seq_len: int = 256,
    cells: int = 0,
    tracking_uri: str | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """Evaluate versions (numbers or @aliases; default all) on one held-out split of one dataset.
    With cells > 0, each entry also names the version's best cell per feature of the text
    (charlm.visualize) over the split's first `cells` characters it can read.

    The dataset is the named one, else the champion's, else the one all the versions were trained
    on. Every version sees the same characters in the same stream layout (fp32, state carried
    across batches); a version whose vocab lacks some characters of the dataset is scored on the
    text with those characters removed, and its entry says how many ('coverage' < 1, a note).
    Results are ranked by bits per character, best first.
    """
    validate_model_name(name)
    s = TrackingSession.open(tracking_uri, store)
    rm = _registered_model(s, name)
    aliases: dict[int, list[str]] = {}
    for a, v in (rm.aliases or {}).items():
        aliases.setdefault(int(v), []).append(a)
    if versions:
        nums = [_resolve_version(s, name, v) for v in versions]
    else:
        nums = [int(mv.version) for mv in _all_versions(s.client, name)]
    nums = list(dict.fromkeys(nums))
    if not nums:
        raise TrackingError(f"model {name}: has no versions to compare")
    infos = {v: _version_info(s, name, v) for v in nums}
    if dataset is None:
        dataset = _common_dataset(s, name, rm, infos)
    ds, ids = _held_out(dataset, store, split, max_chars)

    results, notes = [], []
    for v in nums:
        entry, note = _score_version(s, name, v, ds, ids, split, batch_size, seq_len, cells)
        entry = {
            "version": v,
            "aliases": sorted(aliases.get(v, [])),
            "trained_on": infos[v]["tags"].get("dataset_id"),
            "registered_val_bpc": _float_or_none(infos[v]["tags"].get("val_bpc")),
            "sweep": infos[v]["tags"].get("charlm.sweep"),  # the sweep it won, if it came from one
            **entry,
        }
        results.append(entry)
        if note:
            notes.append(note)
    ranked = sorted(results, key=lambda r: (r["bpc"] is None, r["bpc"] if r["bpc"] is not None else 0.0))
    for i, r in enumerate(ranked):
        r["rank"] = i + 1 if r["bpc"] is not None else None
    return {
        "name": name,
        "dataset": ds.id,
        "split": split,
        "chars": len(ids),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "results": ranked,
        "ranking": [r["version"] for r in ranked if r["bpc"] is not None],
        "notes": notes,
    }


def _common_dataset(s: TrackingSession, name: str, rm: Any, infos: dict[int, dict[str, Any]]) -> str:
    """The champion's dataset, else the one all the versions were trained on."""
    champ = (rm.aliases or {}).get(CHAMPION)
    champ_ds = _version_info(s, name, int(champ))["tags"].get("dataset_id") if champ else None
    trained_on = {i["tags"].get("dataset_id") for i in infos.values()}
    if champ_ds:
        return champ_ds
    if len(trained_on) == 1 and None not in trained_on:
        return trained_on.pop()
    raise TrackingError(
        f"model {name}: versions {', '.join(map(str, infos))} record no common dataset; pass --dataset ID"
    )


def _held_out(dataset: str, store: str | None, split: str, max_chars: int | None) -> tuple[Any, np.ndarray]:
    """(the dataset, the ids of its split, cut to max_chars), or a TrackingError saying why not."""
    from charlm.datasets import DatasetError, open_dataset

    try:
        ds = open_dataset(dataset, store)
    except (DatasetError, OSError) as e:
        raise TrackingError(f"dataset {dataset}: {first_line(e)}") from None
    if ds is None:
        raise TrackingError(f"dataset {dataset}: not found in {storage.store_root(store)}")
    if split not in ds.splits:
        raise TrackingError(f"dataset {ds.id}: no split {split!r} (has {', '.join(ds.splits)})")
    ids = np.asarray(ds.splits[split])
    if max_chars is not None:
        ids = ids[: max(0, int(max_chars))]
    if len(ids) < 2:
        hint = "; try --split val" if split == "test" else ""
        raise TrackingError(
            f"dataset {ds.id}: the {split} split has {len(ids)} characters, too few to score{hint}"
        )
    return ds, ids


def _score_version(
    s: TrackingSession,
    name: str,
    v: int,
    ds: Any,
    ids: np.ndarray,
    split: str,
    batch_size: int,
    seq_len: int,
    cells: int = 0,
) -> tuple[dict[str, Any], str | None]:
    """(the score fields of version v's entry, a note on what it could not score or None)."""
    from charlm import checkpoint
    from charlm.scoring import score_text

    label = f"models:/{name}/{v}"
    with tempfile.TemporaryDirectory(prefix="charlm-compare-") as tmp:
        folder = _download_model_dir(s, name, v, tmp)
        ck = checkpoint.load(_checkpoint_in(folder, label), name=label)
    model, vocab, _ = checkpoint.load_model(ck, name=label, device="cpu")
    sc = score_text(model, vocab, ds.vocab, ids, batch_size, seq_len, device="cpu")
    entry: dict[str, Any] = {
        "chars": sc.chars,
        "chars_skipped": sc.chars_skipped,
        "coverage": sc.coverage,
        "same_vocab": sc.same_vocab,
        "loss": sc.loss,
        "bpc": sc.bpc,
        "chars_scored": sc.chars_scored,
    }
    if cells > 0:
        entry["best_cells"] = _best_cells(model, vocab, ds.vocab.decode(ids[: 2 * cells]), cells)
    if sc.loss is None:
        return (
            entry,
            f"version {v}: its vocab encodes none of the {split} text of dataset {ds.id}; not scored",
        )
    if sc.chars_skipped:
        shown = ", ".join(repr(c) for c in sorted(sc.dropped, key=lambda c: -sc.dropped[c])[:8])
        return entry, (
            f"version {v}: vocab differs from dataset {ds.id}; scored only on text it can encode "
            f"({sc.chars_skipped} of {len(ids)} characters removed: {shown})"
        )
    return entry, None


def _best_cells(model: Any, vocab: Any, text: str, chars: int) -> dict[str, dict[str, Any] | None]:
    """Each feature's best cell (layer, kind, cell, r) over the first `chars` characters of text
    the model's vocabulary encodes; None for a feature constant there."""
    from charlm import visualize

    kept = "".join(c for c in text if c in vocab)[:chars]
    if len(kept) < 2:
        return {}
    an = visualize.analyze(model, vocab.encode(kept), kept, best=1, sample=0)
    return {k: (cells[0].to_dict() if cells else None) for k, cells in an.best.items()}


# -- evaluation records (flows/evaluate.py) ------------------------------------------------------------------------------
def log_evaluation(
    decision: dict[str, Any],
    comparison: dict[str, Any] | None,
    *,
    tracking_uri: str | None = None,
    store: str | None = None,
) -> str:
    """Record a promotion decision as a FINISHED run in the charlm-evaluations experiment (params,
    both scores as metrics, decision tags, comparison JSON) and as tags on the candidate version.
    Returns the run id."""
    s = TrackingSession.open(tracking_uri, store)
    client = s.client
    exp_id = ensure_experiment(s, EVALUATION_EXPERIMENT, store)
    name, cand = decision["name"], decision["candidate"]
    run = client.create_run(exp_id, run_name=f"{name}-v{cand}")
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(decision[k]), now, 0)
            for k in ("candidate_bpc", "champion_bpc", "improvement_bpc")
            if isinstance(decision.get(k), int | float)
        ]
        params = {
            k: decision[k]
            for k in ("name", "candidate", "champion", "alias", "dataset", "split", "margin")
            if decision.get(k) is not None
        }
        tags = {"decision": decision["decision"], "promoted": str(bool(decision["promoted"])).lower()}
        tags["reason"] = decision.get("reason", "")
        _log_batch(client, run_id, metrics=metrics, params=params, tags=tags)
        _log_json(client, run_id, {"decision": decision, "comparison": comparison}, "evaluation.json")
        prefix = f"evaluation.{decision.get('alias', CHAMPION)}"
        for k, v in {
            f"{prefix}.decision": decision["decision"],
            f"{prefix}.candidate_bpc": decision.get("candidate_bpc"),
            f"{prefix}.champion_bpc": decision.get("champion_bpc"),
            f"{prefix}.champion": decision.get("champion"),
            f"{prefix}.dataset": decision.get("dataset"),
            f"{prefix}.run_id": run_id,
        }.items():
            if v is not None:
                client.set_model_version_tag(name, str(cand), k, redact(_str(v)))
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id
