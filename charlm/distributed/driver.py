"""The driver of a distributed run: its name, its run folder (new, resumed or already finished),
Ray Train's TorchTrainer, and publishing the result (best.pt, last.pt, then summary.json)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from charlm import refs, runs, storage
from charlm.config import TrainConfig
from charlm.distributed.dataspec import DataSpec, resolve_data
from charlm.distributed.errors import (
    DistributedTrainingError,
    RunExistsError,
    RunNotFoundError,
    first_line,
)
from charlm.distributed.session import cluster_address, ensure_ray, resources, torch_config
from charlm.distributed.worker import _train_loop_per_worker

log = logging.getLogger(__name__)


# -- run names and the run folder ---------------------------------------------------------------------
def derive_run_name(cfg: TrainConfig, data_id: str, workers: int) -> str:
    """A name that is a pure function of what decides the run: the same command gets the same name
    (and resumes), any other parameter gives another."""
    key = json.dumps(
        {"train_config": cfg.to_dict(), "data": data_id, "workers": int(workers)}, sort_keys=True
    )
    h = hashlib.sha256(key.encode()).hexdigest()
    return f"charlm-{data_id[:8]}-w{int(workers)}-{h[:12]}"


@contextlib.contextmanager
def _run_files() -> Iterator[None]:
    """A run folder's unreadable JSON file, as this package's error."""
    try:
        yield
    except runs.RunFileError as e:
        raise DistributedTrainingError(str(e)) from None


def _run_record(cfg: TrainConfig, spec: DataSpec, data_ref: str, name: str, workers: int) -> dict[str, Any]:
    return {
        "format": runs.RUN_FORMAT,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_ref": data_ref,
        "data": asdict(spec),
        "workers": int(workers),
        "train_config": cfg.to_dict(),
    }


def _check_same_run(record: dict[str, Any], cfg: TrainConfig, spec: DataSpec, workers: int, url: str) -> None:
    diffs = []
    old_cfg = record.get("train_config", {})
    for k, v in cfg.to_dict().items():
        if old_cfg.get(k) != v:
            diffs.append(f"{k} {old_cfg.get(k)!r} -> {v!r}")
    if record.get("data", {}).get("fingerprint") != spec.fingerprint:
        diffs.append(f"data {record.get('data', {}).get('label')} -> {spec.label}")
    if record.get("workers") != workers:
        diffs.append(f"workers {record.get('workers')} -> {workers}")
    if diffs:
        raise RunExistsError(
            f"{url}: run was started with other parameters ({'; '.join(diffs[:4])}); "
            "resume it with the same ones or choose another --run-name"
        )


def _open_run(
    url: str, name: str, explicit: bool, resume: bool, cfg: TrainConfig, spec: DataSpec, workers: int
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(run.json's record or None for a new run, summary.json's content if the run finished);
    refuses a name that is taken, a resume of nothing, and a resume with other parameters."""
    with _run_files():
        record = runs.read_json(url, runs.RUN_FILE)
    if record is None:
        if resume:
            raise RunNotFoundError(f"{url}: no such run to resume (no {runs.RUN_FILE})")
        if storage.ls(url):
            raise RunExistsError(f"{url}: folder exists but is not a charlm run; choose another run name")
        return None, None
    if explicit and not resume:
        raise RunExistsError(
            f"{url}: run {name} already exists; pass --resume-run to continue it or choose another --run-name"
        )
    _check_same_run(record, cfg, spec, workers, url)
    with _run_files():
        return record, runs.read_json(url, runs.SUMMARY_FILE)


def ray_storage(root: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfig, through charlm's storage adapter."""
    lp = storage.local_path(root)
    if lp is not None:
        os.makedirs(lp, exist_ok=True)
        return lp, None
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(root)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# ~80 lines, most of them the documented parameters; the body is a sequence of calls.
def train_distributed(
    cfg: TrainConfig,
    data_ref: str | refs.DataRef,
    *,
    store: str | None = None,
    workers: int = 2,
    use_gpu: bool | None = None,
    run_name: str | None = None,
    resume: bool = False,
    max_failures: int = 2,
    num_to_keep: int = 2,
    cpus_per_worker: float | None = None,
    collective_timeout_s: int = 180,
    extra_callbacks: Callable[[], list[Any]] | None = None,
    rank_callbacks: Callable[[int, int], list[Any]] | None = None,
    on_run_folder: Callable[[str], Callable[[], list[Any]]] | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Train under Ray Train on `workers` DDP workers; returns a JSON-able summary.

    data_ref: dataset id/prefix/name/URL in the store, or a raw corpus (file, folder, builtin).
    use_gpu: None = GPUs if the cluster has one per worker. run_name: None derives it from the
    parameters (same parameters -> same run, resumed if unfinished); an explicit name must be new
    unless resume=True, which requires the run to exist with the same parameters.
    max_failures: worker-group restarts allowed (from the last checkpoint). num_to_keep: Ray
    checkpoints kept (lowest val loss; the latest is always kept). collective_timeout_s: how long a
    rank waits in a collective for a dead peer. extra_callbacks: a picklable factory called on rank 0
    inside the worker; rank_callbacks: one called on every rank as f(rank, world_size).
    on_run_folder: called with the run folder's URL once the run is about to train (new or
    resumed), before any worker starts; the factory it returns is rank 0's extra_callbacks (e.g.
    charlm.tracking's bind_folder: the MLflow run recorded in that folder, continued).

    A finished run is not trained again: its summary is returned with "already_finished": True.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if max_failures < -1:
        raise ValueError(f"max_failures must be -1 (unlimited) or >= 0, got {max_failures}")
    if on_run_folder is not None and extra_callbacks is not None:
        raise ValueError("pass extra_callbacks or on_run_folder, not both")
    root = storage.store_root(store)
    data_ref = refs.resolve_data(data_ref, root)  # typed already when the CLI or a flow resolved it
    spec, payload = resolve_data(data_ref, cfg, root)
    name = runs.check_run_name(run_name) if run_name else derive_run_name(cfg, spec.id, workers)
    url = runs.run_url(name, root)
    record, done = _open_run(url, name, bool(run_name), resume, cfg, spec, workers)
    if done is not None:
        log.warning("run %s already finished (%s); not training again", name, url)
        return {**done, "already_finished": True}
    if record is not None:
        log.warning("resuming run %s from its last checkpoint in %s", name, url)

    ensure_ray()
    use_gpu, cpus, threads = resources(workers, use_gpu, cpus_per_worker)
    if record is None:
        runs.write_json(url, runs.RUN_FILE, _run_record(cfg, spec, data_ref.given, name, workers), indent=1)
    if on_run_folder is not None:
        extra_callbacks = on_run_folder(url)

    import ray

    driver = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    loop_config = {
        "train_config": cfg.to_dict(),
        "data": asdict(spec),
        "payload": ray.put(payload) if payload is not None else None,
        "run_url": url,
        "threads": threads,
        "use_gpu": use_gpu,
        "driver": driver,
        "extra_callbacks": extra_callbacks,
        "rank_callbacks": rank_callbacks,
        "quiet": quiet,
    }
    trainer = _trainer(
        loop_config, name, root, workers, use_gpu, cpus, max_failures, num_to_keep, collective_timeout_s
    )
    t0 = time.perf_counter()
    result = _fit(trainer, name, url, max_failures)
    fit_seconds = time.perf_counter() - t0
    return _publish(result, url, name, spec, workers, use_gpu, driver, fit_seconds)


def _fit(trainer: Any, name: str, url: str, max_failures: int) -> Any:
    """trainer.fit(); a failed run as one DistributedTrainingError naming its first cause."""
    from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

    try:
        return trainer.fit()
    except TrainingFailedError as e:
        if isinstance(e, WorkerGroupError) and e.worker_failures:
            why = _explain_worker_failures(e.worker_failures)
        else:
            why = first_line(e).removeprefix("Training failed due to controller error:").strip()
        restarts = "no restarts allowed" if max_failures == 0 else f"after {max_failures} restart(s)"
        raise DistributedTrainingError(
            f"run {name} failed ({restarts}): {why}; checkpoints so far are kept in {url}: "
            "run the same command again (or --resume-run) to continue"
        ) from e


def _trainer(
    loop_config: dict[str, Any],
    name: str,
    root: str,
    workers: int,
    use_gpu: bool,
    cpus: float,
    max_failures: int,
    num_to_keep: int,
    collective_timeout_s: int,
) -> Any:
    """Ray Train's TorchTrainer for the run `name` in <root>/runs: the same name and storage resume
    the run, checkpoints are kept by val loss."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    storage_path, storage_fs = ray_storage(runs.runs_root(root))
    per_worker = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=torch_config(TorchConfig, "nccl" if use_gpu else "gloo", int(collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


_COLLATERAL = re.compile(
    r"remote worker|closed by peer|reset by peer|Connection refused|NCCL.*(abort|timeout)", re.I
)
_EXIT_DETAIL = re.compile(r"Worker exit detail: (.+?)(?:\. |\.?$)", re.S)


def _explain_worker_failures(failures: dict[int, BaseException]) -> str:
    """One line for the failure that caused the others: a worker's own error first, then a worker
    that died, and only then the collective errors its peers saw when it vanished."""

    def kind(err: BaseException) -> int:
        text = str(err)
        if "actor died" in text or "process has died" in text or "health check failed" in text:
            return 1
        return 2 if _COLLATERAL.search(text) else 0

    rank, err = min(failures.items(), key=lambda kv: (kind(kv[1]), kv[0]))
    if kind(err) == 1:
        m = _EXIT_DETAIL.search(str(err))
        return f"worker rank {rank} died ({m.group(1).strip() if m else 'its process exited'})"
    return f"worker rank {rank}: {type(err).__name__}: {first_line(err)}"


def _publish(result, url, name, spec, workers, use_gpu, driver, fit_seconds) -> dict[str, Any]:
    """Copy the best and the last Ray checkpoint to best.pt / last.pt, then summary.json (last)."""
    from charlm import checkpoint as ckpt_mod

    if result.checkpoint is None:
        raise DistributedTrainingError(f"run {name} finished without reporting a checkpoint ({url})")

    def ck_url(ck) -> str:
        return storage.join(url, storage.basename(ck.path), runs.CKPT_FILE)

    kept = [(ck, m) for ck, m in (result.best_checkpoints or []) if m.get("val_loss") is not None]
    best_ck = min(kept, key=lambda cm: (cm[1]["val_loss"], cm[1].get("step", 0)))[0] if kept else None
    last_src = ck_url(result.checkpoint)
    best_src = ck_url(best_ck) if best_ck is not None else last_src
    published = {}
    for target, src in ((runs.BEST_FILE, best_src), (runs.LAST_FILE, last_src)):
        data = storage.read_bytes(src)
        ckpt_mod.load(data, name=src)  # never publish a file that does not load
        storage.write_bytes_atomic(storage.join(url, target), data)
        published[target] = storage.join(url, target)
    with _run_files():
        attempts = runs.read_attempts(url)
    mine = [a for a in attempts if a.get("driver") == driver]
    train_result = dict(result.return_value or {})
    metrics = result.metrics or {}
    summary = {
        "run_name": name,
        "run_url": url,
        "out_dir": url,
        "corpus": spec.label,
        "dataset_id": spec.id if spec.kind == "dataset" else None,
        "dataset_url": spec.url,
        "corpus_fingerprint": spec.fingerprint,
        "vocab_size": spec.vocab_size,
        "best_checkpoint": published[runs.BEST_FILE],
        "last_checkpoint": published[runs.LAST_FILE],
        "best_source": best_src,
        "last_source": last_src,
        **train_result,
        "workers": workers,
        "use_gpu": use_gpu,
        "backend": "nccl" if use_gpu else "gloo",
        "workers_chars_per_s": metrics.get("workers_chars_per_s"),
        "last_report": metrics,
        "restarts": max(0, len(mine) - 1),
        "resumed_from_step": mine[0].get("resumed_from_step") if mine else None,
        "attempts": attempts,
        "driver_sessions": len({a.get("driver") for a in attempts}),
        "fit_seconds": fit_seconds,
        "ray_address": cluster_address(),
    }
    runs.write_summary(url, summary, indent=1)
    return summary
