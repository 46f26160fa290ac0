"""Find the checkpoints of a training run folder, local or in object storage, without Ray.

A distributed run lives in ``<store>/runs/<name>/`` (see charlm.distributed): after success it
holds ``best.pt``, ``last.pt`` and ``summary.json``; while running (or after a crash) only Ray's
``checkpoint_<step>/checkpoint.pt`` folders and ``checkpoint_manager_snapshot.json``. A local
``charlm train --out DIR`` folder holds ``best.pt`` / ``last.pt`` directly. `find_checkpoint`
accepts all of these, and a checkpoint file itself.
"""

from __future__ import annotations

import json
from typing import Any

from charlm import storage

CKPT_FILE = "checkpoint.pt"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
PUBLISHED = {"best": ("best.pt", "last.pt"), "last": ("last.pt", "best.pt")}


class RunError(FileNotFoundError):
    """A run folder or checkpoint reference that holds no usable checkpoint; names the URL."""


def _is_file(url: str) -> bool:
    try:
        return storage.exists(url) and not storage.isdir(url)
    except storage.StorageError:
        return False


def _snapshot_entries(folder: str) -> list[dict[str, Any]] | None:
    """Ray's committed checkpoints, [{dir, step, val_loss, latest}], or None without a snapshot."""
    try:
        state = json.loads(storage.read_bytes(storage.join(folder, RAY_SNAPSHOT)))
    except (storage.ObjectNotFoundError, ValueError):
        return None
    latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    out = []
    for r in state.get("checkpoint_results", []):
        m = r.get("metrics") or {}
        out.append(
            {
                "dir": r.get("checkpoint_dir_name"),
                "step": m.get("step"),
                "val_loss": m.get("val_loss"),
                "latest": r.get("checkpoint_dir_name") == latest,
            }
        )
    return [e for e in out if e["dir"]]


def ray_checkpoints(folder: str) -> list[str]:
    """URLs of the checkpoint files in a run folder's checkpoint_* dirs, oldest step first."""
    dirs = [u for u in storage.ls(folder) if storage.basename(u).startswith("checkpoint_")]
    dirs = [d for d in dirs if storage.isdir(d)]
    return [storage.join(d, CKPT_FILE) for d in sorted(dirs, key=storage.basename)]


def find_checkpoint(ref: str, which: str = "best", store: str | None = None) -> str:
    """The URL/path of a checkpoint file for a run folder or checkpoint reference.

    ref: a checkpoint file, a run folder (local path or URL), or the bare name of a run in
    `<store>/runs/` (store: the argument, else $CHARLM_STORE, else ~/.charlm/store).
    which="best": published best.pt, else last.pt; without them (a run still going or crashed),
    Ray's committed checkpoint with the lowest val loss, else the newest checkpoint_* folder.
    which="last": the same with last.pt / the latest checkpoint first.
    """
    if which not in PUBLISHED:
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    given = ref
    ref = storage.normalize_url(ref)
    if _is_file(ref):
        return ref
    if not storage.exists(ref):
        named = storage.join(storage.store_root(store), "runs", given)
        if "/" in given or "://" in given or not storage.exists(named):
            raise RunError(f"{given}: no such checkpoint file, run folder or run name")
        ref = named
    for name in PUBLISHED[which]:
        url = storage.join(ref, name)
        if _is_file(url):
            return url
    entries = _snapshot_entries(ref)
    if entries:
        if which == "best":
            scored = [e for e in entries if e["val_loss"] is not None]
            pick = min(scored, key=lambda e: (e["val_loss"], e["step"] or 0)) if scored else None
        else:
            pick = next((e for e in entries if e["latest"]), None)
        if pick is not None:
            url = storage.join(ref, pick["dir"], CKPT_FILE)
            if _is_file(url):
                return url
    found = [u for u in ray_checkpoints(ref) if _is_file(u)]
    if found:
        return found[-1]
    raise RunError(f"{ref}: holds no best.pt, last.pt or checkpoint_*/{CKPT_FILE} (not a charlm run folder?)")


def load_checkpoint(ref: str, which: str = "best", store: str | None = None) -> tuple[dict[str, Any], str]:
    """(checkpoint dict, its URL) for `find_checkpoint(ref, which, store)`, read through the storage
    adapter (local files directly; object stores as bytes)."""
    from charlm import checkpoint

    url = find_checkpoint(ref, which, store)
    lp = storage.local_path(url)
    if lp is not None:
        return checkpoint.load(lp, name=url), url
    return checkpoint.load(storage.read_bytes(url), name=url), url
