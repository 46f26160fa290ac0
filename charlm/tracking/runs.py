"""The run lifecycle: start_run opens an MLflow run with its lineage and ends it FINISHED, FAILED
or KILLED; TrackedRun is what the training code gets; tracked_training is the whole thing around
any training function, plus registration."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from charlm import __version__, storage
from charlm.errors import first_line
from charlm.tracking.callback import TrackingCallback, callback_factory
from charlm.tracking.lineage import (
    DatasetInfo,
    _dataset_tags,
    _log_dataset_input,
    describe_dataset,
    git_commit,
)
from charlm.tracking.redact import display_uri
from charlm.tracking.registry import _register, validate_model_name
from charlm.tracking.session import (
    TrackingError,
    TrackingSession,
    _log_batch,
    _log_json,
    ensure_experiment,
)
from charlm.train import Callback

DEFAULT_EXPERIMENT = "charlm"
EXPERIMENT_ENV = "CHARLM_MLFLOW_EXPERIMENT"
RUN_FILE = "mlflow-run.json"


@dataclass
class TrackedRun:
    """An open MLflow run (what start_run yields)."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    store: str | None = None
    dataset: DatasetInfo | None = None
    callback_options: dict[str, Any] = field(default_factory=dict)
    session: TrackingSession | None = field(default=None, repr=False, compare=False)

    def _session(self) -> TrackingSession:
        if self.session is None:
            self.session = TrackingSession.at(self.tracking_uri)
        return self.session

    @property
    def client(self) -> MlflowClient:
        """The run's client, with MLflow's globals pinned back to its URI."""
        return self._session().pin()

    def callbacks(self) -> list[Callback]:
        """[TrackingCallback] for this run, to pass to charlm.train.train / run_local_training."""
        return [TrackingCallback(self.tracking_uri, self.run_id, **self.callback_options)]

    def callback_factory(self) -> Callable[[], list[Callback]]:
        """Picklable factory of the same callbacks, for a Ray worker (rank 0 logs)."""
        return callback_factory(self.tracking_uri, self.run_id, **self.callback_options)

    def log_params(self, params: dict[str, Any]) -> None:
        _log_batch(self.client, self.run_id, params=params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        _log_batch(self.client, self.run_id, tags=tags)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The training summary: final numbers as metrics, fingerprint/out dir as tags, JSON artifact."""
        client = self.client
        step = int(summary.get("steps") or 0)
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"final_{k}" if k in ("val_loss", "val_bpc") else k, float(summary[k]), now, step)
            for k in ("best_val_loss", "best_val_bpc", "val_loss", "val_bpc", "train_seconds")
            if isinstance(summary.get(k), int | float) and math.isfinite(float(summary[k]))
        ]
        tags = {}
        if summary.get("corpus_fingerprint"):
            tags["corpus_fingerprint"] = summary["corpus_fingerprint"]
            if self.dataset is not None and not self.dataset.id:
                tags["dataset_fingerprint"] = summary["corpus_fingerprint"]
        for k in ("out_dir", "best_checkpoint", "stopped_by"):
            if summary.get(k):
                tags[k] = summary[k]
        _log_batch(client, self.run_id, metrics=metrics, tags=tags)
        _log_json(client, self.run_id, summary, "summary.json")

    def register(self, checkpoint: str, name: str, *, tags: dict[str, Any] | None = None) -> dict[str, Any]:
        """Register checkpoint (path or URL) as a new version of model name, linked to this run."""
        return _register(
            self._session(),
            checkpoint,
            name,
            run_id=self.run_id,
            dataset_id=self.dataset.id if self.dataset else None,
            tags=tags,
        )

    def info(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": display_uri(self.tracking_uri),
        }


@contextlib.contextmanager
def start_run(
    *,
    tracking_uri: str | None = None,
    store: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    dataset: DatasetInfo | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    resume_run_id: str | None = None,
    callback_options: dict[str, Any] | None = None,
    session: TrackingSession | None = None,
) -> Iterator[TrackedRun]:
    """Open an MLflow run for a training job and end it FINISHED, or FAILED if the block raises
    (KILLED on KeyboardInterrupt), with the error's first line as the tag charlm.error.

    dataset: its id, fingerprint, URL and source URLs become tags (and dataset_id a param), its
    manifest the artifact dataset/manifest.json. resume_run_id reopens that run instead.
    The run is created through MlflowClient, so nothing marks it FINISHED behind our back.
    session: an open TrackingSession to use instead of tracking_uri/store.
    """
    s = session or TrackingSession.open(tracking_uri, store)
    if resume_run_id:
        run_id, exp_id = _reopen(s, resume_run_id)
    else:
        exp_name = experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
        run_id, exp_id = _create(s, exp_name, store, run_name, tags)
    tracked = TrackedRun(
        run_id=run_id,
        experiment_id=exp_id,
        tracking_uri=s.uri,
        store=store,
        dataset=dataset,
        callback_options=dict(callback_options or {}),
        session=s,
    )
    try:
        if dataset is not None and not resume_run_id:
            _log_lineage(s.client, run_id, dataset)
        if params:
            _log_batch(s.client, run_id, params=params)
        yield tracked
    except BaseException as e:
        _end_failed(s, run_id, e)
        raise
    s.pin().set_terminated(run_id, status="FINISHED")


def _reopen(s: TrackingSession, run_id: str) -> tuple[str, str]:
    """(run id, experiment id) of an existing run, marked RUNNING again."""
    try:
        with s.errors():
            run = s.client.get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"run {run_id}: not found in {s.shown}") from e
    s.client.update_run(run_id, status="RUNNING")
    return run.info.run_id, run.info.experiment_id


def _create(
    s: TrackingSession, exp_name: str, store: str | None, run_name: str | None, tags: dict[str, Any] | None
) -> tuple[str, str]:
    """(run id, experiment id) of a new run in experiment exp_name (created if missing), tagged
    with charlm's version and git commit and tags."""
    with s.errors():
        exp_id = ensure_experiment(s, exp_name, store)
    base = {
        "charlm_version": __version__,
        "mlflow.source.type": "LOCAL",
    }
    commit = git_commit()
    if commit:
        base["mlflow.source.git.commit"] = commit
        base["git_commit"] = commit
    run = s.client.create_run(exp_id, run_name=run_name)
    run_id = run.info.run_id
    _log_batch(s.client, run_id, tags={**base, **(tags or {})})
    return run_id, exp_id


def _log_lineage(client: MlflowClient, run_id: str, dataset: DatasetInfo) -> None:
    """The dataset as params, tags, manifest artifact and run input."""
    _log_batch(
        client,
        run_id,
        params={"dataset_id": dataset.id or "", "corpus": dataset.label},
        tags=_dataset_tags(dataset),
    )
    if dataset.manifest:
        _log_json(client, run_id, dataset.manifest, "dataset/manifest.json")
        _log_dataset_input(client, run_id, dataset)


def _end_failed(s: TrackingSession, run_id: str, e: BaseException) -> None:
    """End the run KILLED (Ctrl-C) or FAILED with the error's first line as charlm.error; errors
    doing so are swallowed: the original error matters more."""
    status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
    with contextlib.suppress(Exception):
        _log_batch(s.pin(), run_id, tags={"charlm.error": f"{type(e).__name__}: {first_line(e)}"[:1000]})
    with contextlib.suppress(Exception):
        s.pin().set_terminated(run_id, status=status)


# -- tracked training: the whole thing for the CLI -----------------------------------------------------------------
def tracked_training(
    run_fn: Callable[[TrackedRun], dict[str, Any]],
    *,
    corpus: str,
    out: str | os.PathLike | None = None,
    store: str | None = None,
    register: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    resume: bool = False,
    params: dict[str, Any] | None = None,
    callback_options: dict[str, Any] | None = None,
    register_tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run run_fn(tracked_run) inside an MLflow run; register its best checkpoint if asked
    (with register_tags added to the version's tags).

    run_fn trains with tracked_run.callbacks() (local) or tracked_run.callback_factory() (Ray) and
    returns the training summary (needs 'best_checkpoint' and 'best_val_bpc' to register). The
    summary comes back with an 'mlflow' entry: run id, experiment id, tracking URI and the
    registered version. A failure anywhere ends the run FAILED and registers nothing.
    With a local out folder the run id is kept in out/mlflow-run.json, and resume=True reopens
    that run, so a resumed training continues the same MLflow run (same tracking URI only).
    """
    s = TrackingSession.open(tracking_uri, store)
    if register is not None:
        validate_model_name(register)
    dataset = describe_dataset(corpus, store)
    local_out = storage.local_path(str(out)) if out is not None else None
    run_file = Path(local_out) / RUN_FILE if local_out is not None else None
    resume_id = None
    if resume and run_file is not None and run_file.is_file():
        saved = json.loads(run_file.read_text())
        if saved.get("tracking_uri") == s.shown:
            resume_id = saved.get("run_id")
    name = run_name or (storage.basename(str(out)) if out is not None else None)
    with start_run(
        session=s,
        store=store,
        experiment=experiment,
        run_name=name,
        dataset=dataset,
        params=params,
        resume_run_id=resume_id,
        callback_options=callback_options,
    ) as tracked:
        if run_file is not None:
            run_file.parent.mkdir(parents=True, exist_ok=True)
            run_file.write_text(json.dumps(tracked.info(), indent=1))
        summary = run_fn(tracked)
        tracked.log_summary(summary)
        info: dict[str, Any] = tracked.info()
        if register is not None:
            best = summary.get("best_checkpoint")
            if not best:
                raise TrackingError(f"model {register}: the training summary names no best checkpoint")
            info["registered"] = tracked.register(str(best), register, tags=register_tags)
    return {**summary, "mlflow": info}
