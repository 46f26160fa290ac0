"""The run lifecycle: start_run opens an MLflow run with its lineage and ends it FINISHED, FAILED
or KILLED; TrackedRun is what the training code gets; tracked_training is the whole thing around
any training function, plus registration."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from charlm import __version__, runs, storage
from charlm.errors import first_line
from charlm.tracking.callback import TrackingCallback, callback_factory, log_params_once, logged_steps
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
RUN_FILE = runs.MLFLOW_FILE  # in a run folder: the MLflow run that tracks it
ATTEMPT_TAG = "charlm.attempt"
ERROR_TAG = "charlm.error"
RESUMES_TAG = "charlm.resumes"  # on a run that took over from one it could not continue
RESUMED_BY_TAG = "charlm.resumed_by"  # on that lost run, pointing at its successor

log = logging.getLogger("charlm.tracking")


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
        values = {
            f"final_{k}" if k in ("val_loss", "val_bpc") else k: summary.get(k)
            for k in ("best_val_loss", "best_val_bpc", "val_loss", "val_bpc", "train_seconds")
        }
        logged = logged_steps(client, self.run_id, keys=list(values))  # the callback's last eval
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in values.items()
            if isinstance(v, int | float) and math.isfinite(float(v)) and step > logged.get(k, -1)
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
    attempt: int = 1,
    callback_options: dict[str, Any] | None = None,
    session: TrackingSession | None = None,
) -> Iterator[TrackedRun]:
    """Open an MLflow run for a training job and end it FINISHED, or FAILED if the block raises
    (KILLED on KeyboardInterrupt), with the error's first line as the tag charlm.error.

    dataset: its id, fingerprint, URL and source URLs become tags (and dataset_id a param), its
    manifest the artifact dataset/manifest.json. resume_run_id reopens that run instead (RUNNING
    again; params it has keep their values, see log_params_once). attempt: the driver attempt
    this is, recorded as the tag charlm.attempt, and its start as charlm.attempt.<n>.started.
    The run is created through MlflowClient, so nothing marks it FINISHED behind our back.
    session: an open TrackingSession to use instead of tracking_uri/store.
    """
    s = session or TrackingSession.open(tracking_uri, store)
    started = {ATTEMPT_TAG: attempt, f"{ATTEMPT_TAG}.{attempt}.started": _now_iso()}
    if resume_run_id:
        run_id, exp_id = _reopen(s, resume_run_id, attempt)
        _log_batch(s.client, run_id, tags={**(tags or {}), **started})
    else:
        exp_name = experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
        run_id, exp_id = _create(s, exp_name, store, run_name, {**(tags or {}), **started})
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
            _log_batch(s.client, run_id, tags=log_params_once(s.client, run_id, params))
        yield tracked
    except BaseException as e:
        _end_failed(s, run_id, e)
        raise
    s.pin().set_terminated(run_id, status="FINISHED")


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _reopen(s: TrackingSession, run_id: str, attempt: int) -> tuple[str, str]:
    """(run id, experiment id) of an existing run, marked RUNNING again; the error an earlier
    attempt ended with moves from charlm.error to charlm.attempt.<that attempt>.error."""
    try:
        with s.errors():
            run = s.client.get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"run {run_id}: not found in {s.shown}") from e
    s.client.update_run(run_id, status="RUNNING")
    error = run.data.tags.get(ERROR_TAG)
    if error is not None:
        _log_batch(s.client, run_id, tags={f"{ATTEMPT_TAG}.{max(1, attempt - 1)}.error": error})
        s.client.delete_tag(run_id, ERROR_TAG)
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
        _log_batch(s.pin(), run_id, tags={ERROR_TAG: f"{type(e).__name__}: {first_line(e)}"[:1000]})
    with contextlib.suppress(Exception):
        s.pin().set_terminated(run_id, status=status)


# -- continuing the MLflow run of a run folder ----------------------------------------------------------------
@dataclass(frozen=True)
class _Continuation:
    """What a run folder's record means for the next driver attempt: continue resume_id, or open a
    new run that takes over from lost (which could not be continued, for the reason why)."""

    attempt: int
    resume_id: str | None = None
    lost: str | None = None
    lost_uri: str | None = None
    why: str | None = None


def _read_record(folder: str) -> dict[str, Any] | None:
    """The folder's mlflow-run.json; None when absent or unreadable (said in a warning: the
    training goes on in a new MLflow run)."""
    try:
        record = runs.read_json(folder, RUN_FILE)
    except runs.RunFileError as e:
        log.warning("%s; a new MLflow run is opened", e)
        return None
    return record if isinstance(record, dict) and record.get("run_id") else None


def _continuation(s: TrackingSession, record: dict[str, Any] | None) -> _Continuation:
    """Continue the recorded run when it is in this tracking store, exists, is not deleted and
    has not FINISHED (RUNNING after a kill, FAILED or KILLED after an error); else a new run."""
    if record is None:
        return _Continuation(attempt=1)
    old, attempt = str(record["run_id"]), int(record.get("attempt") or 1) + 1
    if record.get("tracking_uri") != s.shown:
        return _Continuation(
            attempt, lost=old, lost_uri=record.get("tracking_uri"), why="other tracking store"
        )
    try:
        with s.errors():
            run = s.client.get_run(old)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(e, "error_code", "")):
            raise
        return _Continuation(attempt, lost=old, lost_uri=s.shown, why="not found")
    if run.info.lifecycle_stage == "deleted":
        return _Continuation(attempt, lost=old, lost_uri=s.shown, why="deleted")
    if run.info.status == "FINISHED":
        return _Continuation(attempt, lost=old, lost_uri=s.shown, why="finished")
    return _Continuation(attempt, resume_id=old)


def _retire(s: TrackingSession, c: _Continuation, successor: str) -> None:
    """The run that could not be continued: KILLED if it was left RUNNING, and tagged with its
    successor (a deleted one is restored for that and deleted again). Another tracking store is
    reached only when it is a sqlite file here; failures are warnings, never the training's."""
    if c.lost is None or c.why == "not found":
        return
    if c.lost_uri == s.shown:
        other = s
    elif (c.lost_uri or "").startswith("sqlite:///") and os.path.isfile(
        c.lost_uri.removeprefix("sqlite:///")
    ):
        other = TrackingSession.at(c.lost_uri)
    else:
        log.warning("MLflow run %s in %s left as it is (not reachable from here)", c.lost, c.lost_uri)
        return
    link = successor if other is s else f"{successor} in {s.shown}"
    try:
        client = other.client
        if c.why == "deleted":
            client.restore_run(c.lost)
        if client.get_run(c.lost).info.status == "RUNNING":
            client.set_terminated(c.lost, status="KILLED")
        _log_batch(client, c.lost, tags={RESUMED_BY_TAG: link})
        if c.why == "deleted":
            client.delete_run(c.lost)
    except (MlflowException, OSError) as e:
        log.warning(
            "MLflow run %s in %s: could not mark it taken over (%s)", c.lost, c.lost_uri, first_line(e)
        )
    finally:
        s.pin()


def _open_for_folder(s: TrackingSession, folder: str | None, start: Callable[..., TrackedRun]) -> TrackedRun:
    """The MLflow run of a run folder (None: a new run not tied to one): the recorded run
    continued, or a new one linked both ways to the recorded run it replaces; recorded in the
    folder as soon as it is open."""
    record = _read_record(folder) if folder is not None else None
    c = _continuation(s, record)
    tags = {}
    if c.lost is not None:
        tags[RESUMES_TAG] = c.lost if c.lost_uri == s.shown else f"{c.lost} in {c.lost_uri}"
        tags["charlm.resumes_reason"] = c.why
        log.warning("MLflow run %s cannot be continued (%s); a new run takes over", c.lost, c.why)
    tracked = start(resume_run_id=c.resume_id, attempt=c.attempt, tags=tags)
    if folder is not None:
        record = {**tracked.info(), "tracking_uri": s.shown, "attempt": c.attempt, "opened": _now_iso()}
        runs.write_json(folder, RUN_FILE, record, indent=1)
    _retire(s, c, tracked.run_id)
    return tracked


class TrainingTracker:
    """What tracked_training hands its run_fn: the training's MLflow run, opened on first use.

    bind_folder(folder) opens it for a run folder: the MLflow run recorded there is continued
    (same run id, metrics going on from their last step, attempt + 1), else a new one is opened,
    linked to the recorded one it replaces; the run id is recorded in the folder at once. A local
    out folder is bound before run_fn; a Ray run binds <store>/runs/<name> through
    train_distributed(on_run_folder=tracker.bind_folder). Used without a folder (run_id,
    callbacks(), callback_factory()), it opens a new run.
    """

    def __init__(self, opener: Callable[[str | None], TrackedRun]) -> None:
        self._opener = opener
        self.run: TrackedRun | None = None
        self.folder: str | None = None

    def bind_folder(self, folder: str) -> Callable[[], list[Callback]]:
        """Open the run for folder (once); the picklable rank-0 callback factory of that run."""
        folder = str(folder)
        if self.run is None:
            self.run, self.folder = self._opener(folder), folder
        elif folder != self.folder:
            raise TrackingError(f"MLflow run {self.run.run_id}: already tracks {self.folder}, not {folder}")
        return self.run.callback_factory()

    def tracked(self) -> TrackedRun:
        if self.run is None:
            self.run = self._opener(None)
        return self.run

    @property
    def run_id(self) -> str:
        return self.tracked().run_id

    def callbacks(self) -> list[Callback]:
        return self.tracked().callbacks()

    def callback_factory(self) -> Callable[[], list[Callback]]:
        return self.tracked().callback_factory()

    def info(self) -> dict[str, Any]:
        return self.tracked().info()


def _finished_info(s: TrackingSession, summary: dict[str, Any]) -> dict[str, Any] | None:
    """For a run that had already finished (nothing trained): its recorded MLflow run, when that
    run is in this store and FINISHED; None when there is none to point at."""
    folder = summary.get("run_url") or summary.get("out_dir")
    if not summary.get("already_finished") or not folder:
        return None
    record = _read_record(str(folder))
    if record is None or record.get("tracking_uri") != s.shown:
        return None
    with contextlib.suppress(MlflowException):
        run = s.client.get_run(str(record["run_id"]))
        if run.info.status == "FINISHED" and run.info.lifecycle_stage == "active":
            return {
                "run_id": run.info.run_id,
                "experiment_id": run.info.experiment_id,
                "tracking_uri": s.shown,
            }
    return None


# -- tracked training: the whole thing for the CLI -----------------------------------------------------------------
def tracked_training(
    run_fn: Callable[[TrainingTracker], dict[str, Any]],
    *,
    corpus: Any,
    out: str | os.PathLike | None = None,
    store: str | None = None,
    register: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    params: dict[str, Any] | None = None,
    callback_options: dict[str, Any] | None = None,
    register_tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run run_fn(tracker) inside an MLflow run; register its best checkpoint if asked
    (with register_tags added to the version's tags).

    run_fn trains with tracker.callbacks() (local) or the factory of tracker.bind_folder(run
    folder) / tracker.callback_factory() (Ray), and returns the training summary (needs
    'best_checkpoint' and 'best_val_bpc' to register). The summary comes back with an 'mlflow'
    entry: run id, experiment id, tracking URI and the registered version. A failure once the run
    is open ends it FAILED and registers nothing.

    The MLflow run belongs to a run folder (out, else the one run_fn binds) and its id is kept
    there in mlflow-run.json, so a rerun of a killed training continues the same run (see
    TrainingTracker). A run that had already finished (summary 'already_finished') trains nothing
    and opens no run unless asked to register.
    """
    s = TrackingSession.open(tracking_uri, store)
    if register is not None:
        validate_model_name(register)
    dataset = describe_dataset(corpus, store)
    with contextlib.ExitStack() as stack:

        def start(**kw: Any) -> TrackedRun:
            return stack.enter_context(
                start_run(
                    session=s,
                    store=store,
                    experiment=experiment,
                    dataset=dataset,
                    params=params,
                    callback_options=callback_options,
                    **kw,
                )
            )

        def opener(folder: str | None) -> TrackedRun:
            name = run_name or (storage.basename(folder.rstrip("/")) if folder else None)
            return _open_for_folder(s, folder, functools.partial(start, run_name=name))

        tracker = TrainingTracker(opener)
        if out is not None:
            tracker.bind_folder(str(out))
        summary = run_fn(tracker)
        if tracker.run is None:
            done = _finished_info(s, summary) if register is None else None
            if done is not None:
                return {**summary, "mlflow": done}
            folder = summary.get("run_url") or summary.get("out_dir")
            if folder:
                tracker.bind_folder(str(folder))
        tracked = tracker.tracked()
        tracked.log_summary(summary)
        info: dict[str, Any] = tracked.info()
        if register is not None:
            best = summary.get("best_checkpoint")
            if not best:
                raise TrackingError(f"model {register}: the training summary names no best checkpoint")
            info["registered"] = tracked.register(str(best), register, tags=register_tags)
    return {**summary, "mlflow": info}
