"""The run folder: its file names, its JSON files, and finding its checkpoints, without Ray.

Both ways of training write a run folder. A local ``charlm train --out DIR`` writes
``config.json`` (once the run has started), ``metrics.jsonl``, ``best.pt`` / ``last.pt`` (every
evaluation), ``loss.png`` and ``summary.json`` (last). A distributed run lives in
``<store>/runs/<name>/`` (see charlm.distributed): ``run.json`` (parameters, before training),
``attempts/*.json`` (one per worker-group start), Ray's ``checkpoint_<step>/checkpoint.pt``
folders and ``checkpoint_manager_snapshot.json`` while it runs (or after a crash), and after
success ``best.pt``, ``last.pt`` and ``summary.json`` (written last; its presence means
"finished"). `find_checkpoint` accepts all of these, and a checkpoint file itself. A tracked run of
either kind also holds ``mlflow-run.json``: the MLflow run that tracks it (run id, tracking URI,
driver attempt), written as soon as that run is opened, so a rerun continues the same MLflow run.

Importable with the core install: charlm.storage (the storage extra) is imported where a URL or a
store is read, so a local run writes its JSON files without it.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
SUMMARY_FILE = "summary.json"  # both kinds of run, written last
CONFIG_FILE = "config.json"  # local: the corpus and the train config
METRICS_FILE = "metrics.jsonl"  # local: one JSON line per log/eval record
LOSS_PNG = "loss.png"  # local
RUN_FILE = "run.json"  # distributed: the parameters, written before training
RUN_FORMAT = "charlm.run/1"
MLFLOW_FILE = "mlflow-run.json"  # both kinds: the MLflow run tracking this folder, written as it opens
ATTEMPTS_DIR = "attempts"  # distributed: one JSON file per worker-group start
CKPT_FILE = "checkpoint.pt"  # in each of Ray's checkpoint_<step>/ folders
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
PUBLISHED = {"best": (BEST_FILE, LAST_FILE), "last": (LAST_FILE, BEST_FILE)}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class RunError(FileNotFoundError):
    """A run folder or checkpoint reference that holds no usable checkpoint; names the URL."""


class RunFileError(ValueError):
    """A run folder's JSON file that exists but does not parse; names the URL."""


# -- the run folder's JSON files ----------------------------------------------------------------
def _is_url(folder: str) -> bool:
    return "://" in folder or "::" in folder


def file_url(folder: str | os.PathLike, name: str) -> str:
    """`name` (may hold '/') in a run folder: a plain local path, or a URL in a store."""
    folder = os.fspath(folder)
    if _is_url(folder):
        from charlm import storage

        return storage.join(folder, name)
    return os.path.join(folder, name)


def write_json(folder: str | os.PathLike, name: str, obj: Any, *, indent: int | None = None) -> str:
    """Write one JSON file of a run folder whole (atomically, through charlm.storage); returns its
    URL. Without the storage extra only a local folder can be meant, and it is written directly."""
    url = file_url(folder, name)
    text = json.dumps(obj, indent=indent, default=str)
    try:
        from charlm import storage
    except ImportError:  # core install: a local `charlm train --out` folder
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        Path(url).write_text(text)
        return url
    storage.write_text_atomic(url if _is_url(url) else os.path.abspath(url), text)
    return url


def read_json(folder: str | os.PathLike, name: str) -> Any:
    """One JSON file of a run folder; None when it does not exist, RunFileError when unreadable."""
    return _load_json(file_url(folder, name))


def _load_json(url: str) -> Any:
    from charlm import storage

    try:
        return json.loads(storage.read_bytes(url))
    except storage.ObjectNotFoundError:
        return None
    except ValueError as e:
        raise RunFileError(f"{url}: unreadable ({e})") from None


def write_summary(folder: str | os.PathLike, summary: dict[str, Any], *, indent: int = 1) -> str:
    """summary.json, the last file a finished run writes (local runs: indent=2, as always)."""
    return write_json(folder, SUMMARY_FILE, summary, indent=indent)


def write_attempt(folder: str, record: dict[str, Any]) -> str:
    """attempts/<time>-<random>.json: one per start of a distributed run's worker group."""
    return write_json(folder, f"{ATTEMPTS_DIR}/{time.time_ns()}-{uuid.uuid4().hex[:8]}.json", record)


def read_attempts(folder: str) -> list[dict[str, Any]]:
    """The attempt records of a run folder, oldest first."""
    from charlm import storage

    out = []
    for u in storage.ls(storage.join(folder, ATTEMPTS_DIR)):
        if u.endswith(".json") and not storage.basename(u).startswith("."):
            rec = _load_json(u)
            if rec is not None:
                out.append(rec)
    out.sort(key=lambda r: r.get("time", 0.0))
    return out


# -- run folders in a store -----------------------------------------------------------------------
def check_run_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"run name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def runs_root(store: str | None = None) -> str:
    """<store>/runs (store: the argument, else $CHARLM_STORE, else ~/.charlm/store)."""
    from charlm import storage

    return storage.Store.at(store).runs()


def run_url(name: str, store: str | None = None) -> str:
    from charlm import storage

    return storage.join(runs_root(store), check_run_name(name))


# -- finding checkpoints --------------------------------------------------------------------------
def _is_file(url: str) -> bool:
    from charlm import storage

    try:
        return storage.exists(url) and not storage.isdir(url)
    except storage.StorageError:
        return False


def _snapshot_entries(folder: str) -> list[dict[str, Any]] | None:
    """Ray's committed checkpoints, [{dir, step, val_loss, latest}], or None without a snapshot."""
    try:
        state = read_json(folder, RAY_SNAPSHOT)
    except RunFileError:
        return None
    if state is None:
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
    from charlm import storage

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
    from charlm import storage

    given = ref
    ref = storage.normalize_url(ref)
    if _is_file(ref):
        return ref
    if not storage.exists(ref):
        named = storage.join(runs_root(store), given)
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
    raise RunError(
        f"{ref}: holds no {BEST_FILE}, {LAST_FILE} or checkpoint_*/{CKPT_FILE} (not a charlm run folder?)"
    )


def read_checkpoint_file(url: str) -> dict[str, Any]:
    """The validated checkpoint at a path or store URL: a plain path is read without the storage
    extra; a URL through the storage adapter (a local one directly, an object store as bytes)."""
    from charlm import checkpoint

    if not _is_url(url):
        return checkpoint.load(url, name=url)
    from charlm import storage

    lp = storage.local_path(url)
    if lp is not None:
        return checkpoint.load(lp, name=url)
    return checkpoint.load(storage.read_bytes(url), name=url)


def load_checkpoint(ref: str, which: str = "best", store: str | None = None) -> tuple[dict[str, Any], str]:
    """(checkpoint dict, its URL) for `find_checkpoint(ref, which, store)`."""
    url = find_checkpoint(ref, which, store)
    return read_checkpoint_file(url), url
