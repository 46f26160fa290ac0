"""MLflow adapter: tracked runs, registered versions, comparison and promotion by alias.

The only charlm module that imports mlflow (besides charlm/mlflow_model.py, the "models from
code" file MLflow itself executes). Everything takes an explicit tracking URI or derives it here:

* ``MLFLOW_TRACKING_URI`` when set (a tracking server, or a database URI);
* otherwise ``sqlite:///<store>/mlflow.db`` beside a local store, or a per-store database under
  ``~/.charlm/mlflow/`` for a remote store. Never the working directory.

Artifacts of a new experiment go to ``<store>/mlflow-artifacts`` (a folder or an S3 prefix) unless
the tracking URI is a server, which then decides (``mlflow server --artifacts-destination``).

Pieces:

* :func:`start_run` (a context manager): creates a run with the dataset lineage (tags, params,
  manifest artifact) and ends it FINISHED, or FAILED when the block raises (KILLED on Ctrl-C).
* :class:`TrackingCallback`: the training loop's hook; logs on rank 0 only: params (config,
  scaling, precision, versions), metrics per log/eval step, and at the end vocab, metrics JSON,
  loss curve and a temperature sweep of samples. Built from plain strings, so it pickles into a
  Ray worker and works there.
* :func:`tracked_training`: the two together around any training function, plus registration.
* :func:`register_checkpoint`: a checkpoint becomes a new version of a registered pyfunc model
  with dataset id and val bpc as version tags.
* :func:`list_versions`, :func:`compare_versions`, :func:`promote`, :func:`resolve_model_ref`.

Secrets: every string that goes into a param, tag or text artifact passes :func:`redact` first
(URL passwords, signed-URL query values, and the values of secret-looking environment variables).
MLflow keeps process-global state (tracking/registry URI, active experiment); the functions here
set it to the URI they were given before using fluent/registry APIs, so use one tracking URI per
process at a time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is for --json
# MLflow's default retries an unreachable server for about four minutes; about 10 s is enough to
# ride out a restart, and the training callback keeps metrics buffered across longer outages.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from charlm import __version__, storage
from charlm.checkpoint import clean_state_dict
from charlm.train import LN2, Callback, Run
from charlm.vocab import Vocab

log = logging.getLogger("charlm.tracking")

DEFAULT_EXPERIMENT = "charlm"
EXPERIMENT_ENV = "CHARLM_MLFLOW_EXPERIMENT"
EVALUATION_EXPERIMENT = "charlm-evaluations"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"
CHECKPOINT_FILE = "checkpoint.pt"
SAMPLE_TEMPERATURES = (0.2, 0.5, 0.8, 1.0, 1.2)
MODEL_CODE = str(Path(__file__).with_name("mlflow_model.py"))

# The registered model's params and their defaults (the pyfunc's signature is built from these).
PARAM_DEFAULTS: dict[str, Any] = {
    "length": 200,
    "temperature": 0.8,
    "top_k": 0,
    "top_p": 1.0,
    "seed": 0,
    "num_samples": 1,
    "stop": "",
    "precision": "auto",
}

_MAX_PENDING = 1_000_000  # metric values a callback buffers through a tracking outage
_MAX_TAG = 5000  # MLflow limits tag values to 8000 characters, params to 6000
_MAX_PARAM = 5000


class TrackingError(ValueError):
    """A tracking/registry request that cannot be done; one line naming the model, run or URI."""


# -- secrets --------------------------------------------------------------------------------------
_SECRET_ENV = re.compile(
    r"SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY|AUTH|SESSION|SIGNATURE", re.I
)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*):[^/@\s]*@")
_URL_USER = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:[^=&\s]*(?:token|signature|secret|passw|credential|key|sig|auth)[^=&\s]*)=)"
    r"[^&\s#\"'<>]*",
    re.I,
)
_MIN_SECRET_LEN = 8
REDACTED = "***"


def _secret_values() -> list[str]:
    vals = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v.strip()) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def redact(text: str) -> str:
    """text without URL passwords/users, secret query values and secret environment values."""
    if not text:
        return text
    for v in _secret_values():
        text = text.replace(v, REDACTED)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head').split('://')[0]}://{REDACTED}@", text)
    text = _URL_USER.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: m.group("key") + REDACTED, text)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-able structure with every string (keys too) redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k) if isinstance(k, str) else k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    return obj


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v) if isinstance(v, list | dict) else str(v)


# -- where MLflow lives -------------------------------------------------------------------------------
def resolve_tracking_uri(
    tracking_uri: str | None = None, store: str | None = None, create: bool = True
) -> str:
    """The tracking URI to use: the argument, $MLFLOW_TRACKING_URI, else a sqlite file beside the
    store (the store folder itself when local; ~/.charlm/mlflow/<hash of the store URL>.db else),
    whose folder is created unless `create` is False."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = storage.store_root(store)
    local = storage.local_path(root)
    if local is not None:
        db = os.path.join(local, "mlflow.db")
    else:
        digest = hashlib.sha256(root.encode()).hexdigest()[:16]
        db = os.path.join(os.path.expanduser("~/.charlm/mlflow"), f"{digest}.db")
    if create:
        os.makedirs(os.path.dirname(db), exist_ok=True)
    return "sqlite:///" + db


def artifact_root(store: str | None = None) -> str:
    """Where experiments created by charlm keep artifacts when no server decides: in the store."""
    root = storage.join(storage.store_root(store), "mlflow-artifacts")
    local = storage.local_path(root)
    return Path(local).as_uri() if local is not None else root


def is_server(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks")


def display_uri(uri: str) -> str:
    """The URI as it may be shown or logged (no credentials)."""
    return redact(uri)


_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")


@contextlib.contextmanager
def _keep_env() -> Iterator[None]:
    """Undo MLflow's habit of exporting whatever URI/experiment was set last into os.environ: our
    URIs are explicit, and an exported one would override the store's default in later calls
    and leak into child processes."""
    saved = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _activate(uri: str) -> MlflowClient:
    """Point MLflow's process-global tracking and registry URIs at uri; a client for it.
    A registry URI the user set in $MLFLOW_REGISTRY_URI wins, as in MLflow."""
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    with _keep_env():
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(registry)
    return MlflowClient(tracking_uri=uri, registry_uri=registry)


def activate(tracking_uri: str | None = None, store: str | None = None) -> str:
    """Pin MLflow's process-global tracking and registry URIs (what mlflow.pyfunc.load_model
    resolves models:/ against) to the resolved URI; returns it."""
    uri = resolve_tracking_uri(tracking_uri, store)
    _activate(uri)
    return uri


def _code(e: MlflowException) -> str:
    return str(getattr(e, "error_code", "") or "")


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_UNREACHABLE = ("Max retries exceeded", "Failed to establish a new connection", "Connection refused")


def is_unreachable(e: BaseException) -> bool:
    """An MLflow/requests error that means the tracking server could not be reached."""
    text = str(e)
    return isinstance(e, ConnectionError) or any(m in text for m in _UNREACHABLE)


@contextlib.contextmanager
def _errors(uri: str) -> Iterator[None]:
    """Unreachable-server errors as one TrackingError line naming the URI."""
    try:
        yield
    except TrackingError:
        raise
    except (MlflowException, OSError) as e:
        if is_unreachable(e):
            raise TrackingError(f"{display_uri(uri)}: MLflow tracking server unreachable") from e
        raise


def ensure_experiment(client: MlflowClient, name: str, uri: str, store: str | None = None) -> str:
    """The id of the experiment called name, created (artifacts in the store) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None if is_server(uri) else artifact_root(store)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            if "ALREADY_EXISTS" not in _code(e):  # another process created it first
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} is deleted in {display_uri(uri)}; restore it or choose another experiment"
        )
    return exp.experiment_id


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


# -- datasets: the lineage a run records ----------------------------------------------------------------
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


def describe_dataset(corpus: str, store: str | None = None) -> DatasetInfo:
    """DatasetInfo for a training corpus argument (dataset id/name/URL, else a raw corpus)."""
    try:
        from charlm import datasets
        from charlm.ingest import read_manifest
    except ImportError:  # storage extras missing: only raw corpora are possible
        return DatasetInfo(label=corpus)
    if Path(corpus).exists():
        return DatasetInfo(label=corpus)
    try:
        folder = datasets.resolve(corpus, store)
    except (OSError, ValueError):
        folder = None
    if folder is None:
        return DatasetInfo(label=corpus)
    manifest = read_manifest(folder)
    if manifest is None:
        return DatasetInfo(label=corpus)
    return DatasetInfo(
        label=f"dataset {manifest['id']}",
        id=str(manifest["id"]),
        url=folder,
        fingerprint=str(manifest.get("fingerprint") or manifest["id"]),
        manifest=manifest,
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


# -- logging helpers ------------------------------------------------------------------------------------------
def _log_batch(
    client: MlflowClient,
    run_id: str,
    *,
    metrics: Sequence[Metric] = (),
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
) -> None:
    """Params/tags redacted and clipped; everything chunked to MLflow's per-call limits."""
    p = [Param(k, _clip(redact(_str(v)), _MAX_PARAM)) for k, v in (params or {}).items()]
    t = [RunTag(k, _clip(redact(_str(v)), _MAX_TAG)) for k, v in (tags or {}).items()]
    m = list(metrics)
    while p or t or m:
        client.log_batch(run_id, metrics=m[:1000], params=p[:100], tags=t[:100])
        p, t, m = p[100:], t[100:], m[1000:]


def _log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, redact(text), artifact_file)


def _log_json(client: MlflowClient, run_id: str, obj: Any, artifact_file: str) -> None:
    _log_text(client, run_id, json.dumps(redact_obj(obj), indent=1, default=str), artifact_file)


# -- the run --------------------------------------------------------------------------------------------------
def callback_factory(tracking_uri: str, run_id: str, **options: Any) -> Callable[[], list[Callback]]:
    """A picklable zero-argument factory returning [TrackingCallback(...)], for Ray workers."""
    return functools.partial(_make_callbacks, tracking_uri, run_id, options)


def _make_callbacks(tracking_uri: str, run_id: str, options: dict[str, Any]) -> list[Callback]:
    return [TrackingCallback(tracking_uri, run_id, **options)]


@dataclass
class TrackedRun:
    """An open MLflow run (what start_run yields)."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    store: str | None = None
    dataset: DatasetInfo | None = None
    callback_options: dict[str, Any] = field(default_factory=dict)

    @property
    def client(self) -> MlflowClient:
        return _activate(self.tracking_uri)

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
        return register_checkpoint(
            checkpoint,
            name,
            run_id=self.run_id,
            tracking_uri=self.tracking_uri,
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
) -> Iterator[TrackedRun]:
    """Open an MLflow run for a training job and end it FINISHED, or FAILED if the block raises
    (KILLED on KeyboardInterrupt), with the error's first line as the tag charlm.error.

    dataset: its id, fingerprint, URL and source URLs become tags (and dataset_id a param), its
    manifest the artifact dataset/manifest.json. resume_run_id reopens that run instead.
    The run is created through MlflowClient, so nothing marks it FINISHED behind our back.
    """
    uri = resolve_tracking_uri(tracking_uri, store)
    client = _activate(uri)
    exp_name = experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    if resume_run_id:
        try:
            with _errors(uri):
                run = client.get_run(resume_run_id)
        except MlflowException as e:
            raise TrackingError(f"run {resume_run_id}: not found in {display_uri(uri)}") from e
        client.update_run(resume_run_id, status="RUNNING")
        run_id, exp_id = run.info.run_id, run.info.experiment_id
    else:
        with _errors(uri):
            exp_id = ensure_experiment(client, exp_name, uri, store)
        base = {
            "charlm_version": __version__,
            "mlflow.source.type": "LOCAL",
        }
        commit = git_commit()
        if commit:
            base["mlflow.source.git.commit"] = commit
            base["git_commit"] = commit
        run = client.create_run(exp_id, run_name=run_name)
        run_id = run.info.run_id
        _log_batch(client, run_id, tags={**base, **(tags or {})})
    tracked = TrackedRun(
        run_id=run_id,
        experiment_id=exp_id,
        tracking_uri=uri,
        store=store,
        dataset=dataset,
        callback_options=dict(callback_options or {}),
    )
    try:
        if dataset is not None and not resume_run_id:
            _log_batch(
                client,
                run_id,
                params={"dataset_id": dataset.id or "", "corpus": dataset.label},
                tags=_dataset_tags(dataset),
            )
            if dataset.manifest:
                _log_json(client, run_id, dataset.manifest, "dataset/manifest.json")
                _log_dataset_input(client, run_id, dataset)
        if params:
            _log_batch(client, run_id, params=params)
        yield tracked
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):  # the original error matters more than this one
            client = _activate(uri)
            _log_batch(client, run_id, tags={"charlm.error": f"{type(e).__name__}: {_first_line(e)}"[:1000]})
        with contextlib.suppress(Exception):
            _activate(uri).set_terminated(run_id, status=status)
        raise
    _activate(uri).set_terminated(run_id, status="FINISHED")


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


# -- the training callback ---------------------------------------------------------------------------------------
class TrackingCallback(Callback):
    """Logs a training run into an existing MLflow run (rank 0 only).

    Params at start (the full TrainConfig, effective batch size, precision, world size, device,
    vocab size, parameter count, charlm/torch versions); metrics of every log and eval record,
    buffered and written once per evaluation; at the end vocab.json, metrics.json, loss.png and
    samples.md / samples.html: the best weights sampled at each temperature of `temperatures`.

    Built from plain values (tracking URI, run id, options), so it pickles and works in another
    process (a Ray worker). The run's status is left to whoever opened it (start_run).
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        sample_prompts: Sequence[str] = ("",),
        samples_per_prompt: int = 2,
        sample_length: int = 200,
        sample_seed: int = 0,
        temperatures: Sequence[float] = SAMPLE_TEMPERATURES,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.sample_prompts = list(sample_prompts)
        self.samples_per_prompt = int(samples_per_prompt)
        self.sample_length = int(sample_length)
        self.sample_seed = int(sample_seed)
        self.temperatures = [float(t) for t in temperatures]
        self._client: MlflowClient | None = None
        self._pending: list[Metric] = []
        self._records: list[dict[str, Any]] = []
        self._notes: list[str] = []
        self._best_state: dict[str, Any] | None = None
        self._best_step: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # clients hold sessions/connections: rebuilt in the new process
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # -- hooks
    def on_start(self, run: Run) -> None:
        if run.dist.rank != 0:
            return
        params = {k: v for k, v in run.config.to_dict().items()}
        params.update(
            {
                "effective_batch_size": run.batch_size,
                "effective_precision": run.precision,
                "world_size": run.dist.world_size,
                "global_batch_size": run.batch_size * run.dist.world_size,
                "device": str(run.device),
                "vocab_size": len(run.vocab),
                "model_parameters": sum(p.numel() for p in run.model.parameters()),
                "charlm_version": __version__,
                "torch_version": _torch_version(),
            }
        )
        if run.corpus_fingerprint:
            params["corpus_fingerprint"] = run.corpus_fingerprint
        existing = self.client.get_run(self.run_id).data.params if run.step > 0 else {}
        new = {k: v for k, v in params.items() if k not in existing}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != _str(v))
        tags: dict[str, Any] = {}
        if run.step > 0:
            tags["resumed_at_step"] = run.step
            if changed:
                tags["resumed_param_changes"] = ", ".join(changed)
        _log_batch(self.client, self.run_id, params=new, tags=tags)
        _log_text(self.client, self.run_id, run.vocab.to_json(), "vocab.json")

    def on_message(self, run: Run, message: str) -> None:
        if run.dist.rank == 0:
            self._notes.append(message)
            _log_batch(self.client, self.run_id, tags={"charlm.notes": "\n".join(self._notes)})

    def on_log(self, run: Run, metrics: dict[str, Any]) -> None:
        if run.dist.rank == 0:
            self._record("train", metrics)

    def on_eval(self, run: Run, metrics: dict[str, Any]) -> None:
        if run.dist.rank != 0:
            return
        self._record("eval", metrics)
        if run.is_best:
            self._best_state = clean_state_dict(run.eval_model.state_dict())
            self._best_step = run.step
        self.flush(final=False)

    def on_end(self, run: Run, result: dict[str, Any]) -> None:
        if run.dist.rank != 0:
            return
        self.flush()
        client = self.client
        _log_json(client, self.run_id, {"records": self._records, "result": result}, "metrics.json")
        with tempfile.TemporaryDirectory(prefix="charlm-mlflow-") as tmp:
            png = self._loss_png(Path(tmp))
            if png is not None:
                client.log_artifact(self.run_id, str(png))
        sweep = self._sample_sweep(run)
        if sweep:
            _log_text(client, self.run_id, sweep_markdown(sweep), "samples.md")
            _log_text(client, self.run_id, sweep_html(sweep), "samples.html")

    # -- helpers
    def _record(self, kind: str, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("step", 0))
        now = int(time.time() * 1000)
        self._records.append({"kind": kind, **metrics})
        for k, v in metrics.items():
            if k == "step" or not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if math.isfinite(float(v)):
                self._pending.append(Metric(k, float(v), now, step))

    def flush(self, final: bool = True) -> None:
        """Write buffered metrics (one log_batch call per 1000). A non-final flush that finds the
        server unreachable keeps them for the next one, so an outage does not stop training."""
        if not self._pending:
            return
        try:
            _log_batch(self.client, self.run_id, metrics=self._pending)
        except (MlflowException, OSError) as e:
            if final or not is_unreachable(e) or len(self._pending) > _MAX_PENDING:
                raise
            log.warning(
                "MLflow at %s unreachable; %d metric values kept for the next evaluation",
                display_uri(self.tracking_uri),
                len(self._pending),
            )
            return
        self._pending = []

    def _loss_png(self, folder: Path) -> Path | None:
        from charlm.callbacks import plot_losses

        if not self._records:
            return None
        jl = folder / "metrics.jsonl"
        jl.write_text("".join(json.dumps(r) + "\n" for r in self._records))
        return plot_losses(jl, folder / "loss.png")

    def _sample_sweep(self, run: Run) -> list[dict[str, Any]]:
        from charlm.model import CharLM
        from charlm.sample import Sampler

        if not self.temperatures or self.samples_per_prompt < 1 or self.sample_length < 1:
            return []
        model = CharLM(run.model_config)
        state = self._best_state or clean_state_dict(run.eval_model.state_dict())
        model.load_state_dict(state)
        model.eval()
        prompts = [p for p in self.sample_prompts if not run.vocab.unknown(p)] or [""]
        streams = [p for p in prompts for _ in range(self.samples_per_prompt)]
        sampler = Sampler(model, run.vocab, max_batch=len(streams))
        rows = []
        for t in self.temperatures:
            texts = sampler.generate(streams, self.sample_length, temperature=t, seed=self.sample_seed)
            for i, (p, text) in enumerate(zip(streams, texts, strict=True)):
                rows.append({"temperature": t, "stream": i, "prompt": p, "text": text})
        return [{"step": self._best_step if self._best_state else run.step, "seed": self.sample_seed}, *rows]


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def sweep_markdown(sweep: list[dict[str, Any]]) -> str:
    head, rows = sweep[0], sweep[1:]

    def cell(s: str) -> str:
        return html.escape(s).replace("|", "\\|").replace("\n", "<br>") or " "

    lines = [
        f"# Samples at step {head['step']} (seed {head['seed']})",
        "",
        "| temperature | # | prompt | sample |",
        "|---:|---:|---|---|",
    ]
    lines += [
        f"| {r['temperature']:g} | {r['stream']} | {cell(r['prompt'])} | {cell(r['text'])} |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def sweep_html(sweep: list[dict[str, Any]]) -> str:
    head, rows = sweep[0], sweep[1:]
    body = "\n".join(
        f"<tr><td>{r['temperature']:g}</td><td>{r['stream']}</td><td><pre>{html.escape(r['prompt'])}</pre></td>"
        f"<td><pre>{html.escape(r['text'])}</pre></td></tr>"
        for r in rows
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>charlm samples</title>"
        "<style>td{vertical-align:top;border-bottom:1px solid #ccc}pre{white-space:pre-wrap;margin:0}</style>"
        f"<h3>Samples at step {head['step']} (seed {head['seed']})</h3>"
        "<table><tr><th>temperature</th><th>#</th><th>prompt</th><th>sample</th></tr>\n"
        f"{body}\n</table>\n"
    )


# -- tracked training: the whole thing for the CLI -----------------------------------------------------------------
RUN_FILE = "mlflow-run.json"


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
    uri = resolve_tracking_uri(tracking_uri, store)
    if register is not None:
        validate_model_name(register)
    dataset = describe_dataset(corpus, store)
    local_out = storage.local_path(str(out)) if out is not None else None
    run_file = Path(local_out) / RUN_FILE if local_out is not None else None
    resume_id = None
    if resume and run_file is not None and run_file.is_file():
        saved = json.loads(run_file.read_text())
        if saved.get("tracking_uri") == display_uri(uri):
            resume_id = saved.get("run_id")
    name = run_name or (storage.basename(str(out)) if out is not None else None)
    with start_run(
        tracking_uri=uri,
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


# -- registering ---------------------------------------------------------------------------------------------------
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_model_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise TrackingError(
            f"model name {name!r}: use letters, digits, '.', '_' or '-' (no '/', '@' or spaces), "
            "starting with a letter or digit"
        )
    return name


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double", str: "string", bool: "boolean"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in PARAM_DEFAULTS.items()])
    return ModelSignature(
        inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]), params=params
    )


def _requirements() -> list[str]:
    import torch

    return [
        f"charlm=={__version__}",
        f"torch=={str(torch.__version__).split('+')[0]}",
        f"numpy=={np.__version__}",
        f"mlflow=={mlflow.__version__}",
        "pandas",
    ]


def read_checkpoint(ref: str) -> dict[str, Any]:
    """A validated checkpoint dict from a path, a training out folder, or a store URL."""
    from charlm import checkpoint

    local = storage.local_path(ref)
    if local is not None:
        p = Path(local)
        if p.is_dir():
            for n in ("best.pt", "last.pt"):
                if (p / n).is_file():
                    return checkpoint.load(p / n, name=str(p / n))
            raise TrackingError(f"{ref}: folder holds no best.pt or last.pt checkpoint")
        return checkpoint.load(p, name=ref)
    url = storage.normalize_url(ref)
    if storage.isdir(url):
        for n in ("best.pt", "last.pt"):
            if storage.exists(storage.join(url, n)):
                url = storage.join(url, n)
                break
        else:
            raise TrackingError(f"{ref}: prefix holds no best.pt or last.pt checkpoint")
    return checkpoint.load(storage.read_bytes(url), name=url)


def register_checkpoint(
    checkpoint_ref: str,
    name: str,
    *,
    run_id: str,
    tracking_uri: str | None = None,
    store: str | None = None,
    dataset_id: str | None = None,
    tags: dict[str, Any] | None = None,
    await_seconds: int = 300,
) -> dict[str, Any]:
    """Log checkpoint_ref (path or URL) as a pyfunc model of run run_id and register it as a new
    version of name, tagged with dataset_id, val_bpc, val_loss, corpus_fingerprint and step.

    The stored copy holds the evaluated weights, configs and vocab, but no optimizer state and not
    the trained weights a moving average was taken of (inference only).
    Returns {name, version, model_uri, run_id, tags}.
    """
    from mlflow.models import Model

    from charlm import checkpoint

    validate_model_name(name)
    uri = resolve_tracking_uri(tracking_uri, store)
    ck = read_checkpoint(checkpoint_ref)
    client = _activate(uri)
    try:
        with _errors(uri):
            run = client.get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"run {run_id}: not found in {display_uri(uri)}") from e
    slim = {**ck, "optimizer": None, "train_state_dict": None, "carry": None, "rng": {}}
    loss = ck.get("best_val_loss") if ck.get("best_val_loss") is not None else ck.get("val_loss")
    version_tags: dict[str, Any] = {
        "step": int(ck["step"]),
        "charlm_version": str(ck.get("charlm_version", __version__)),
        "vocab_size": len(ck["vocab"]["codepoints"]),
    }
    dataset_id = dataset_id or run.data.tags.get("dataset_id")
    if dataset_id:
        version_tags["dataset_id"] = dataset_id
    if loss is not None:
        version_tags["val_loss"] = f"{float(loss):.6f}"
        version_tags["val_bpc"] = f"{float(loss) / LN2:.6f}"
    if ck.get("corpus_fingerprint"):
        version_tags["corpus_fingerprint"] = ck["corpus_fingerprint"]
    version_tags.update(tags or {})
    version_tags = {k: _clip(redact(_str(v)), _MAX_TAG) for k, v in version_tags.items()}
    with tempfile.TemporaryDirectory(prefix="charlm-register-") as tmp:
        path = os.path.join(tmp, CHECKPOINT_FILE)
        checkpoint.save(slim, path)
        with _keep_env():
            mlflow.set_experiment(experiment_id=run.info.experiment_id)  # where the logged model lives
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*input example was not provided", category=UserWarning
            )
            info = Model.log(
                artifact_path=None,
                name=MODEL_ARTIFACT,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                python_model=MODEL_CODE,
                artifacts={"checkpoint": path},
                signature=_signature(),
                pip_requirements=_requirements(),
                metadata={"charlm_version": __version__, "checkpoint_step": int(ck["step"])},
                flavor_name="pyfunc.ModelFromCode",
            )
        mv = mlflow.register_model(
            info.model_uri, name, await_registration_for=await_seconds, tags=version_tags
        )
    version = int(mv.version)
    return {
        "name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "run_id": run_id,
        "tags": version_tags,
    }


# -- the registry: refs, list, promote -------------------------------------------------------------------------------
_MODELS_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[^/@]+))/?$")


def parse_models_ref(ref: str) -> tuple[str, int | None, str | None]:
    """(name, version, alias) of 'models:/NAME/VERSION', 'models:/NAME/latest' (version None,
    alias None) or 'models:/NAME@ALIAS'."""
    m = _MODELS_REF.match(ref.strip())
    if not m:
        raise TrackingError(f"{ref}: not a model reference (want models:/NAME/VERSION or models:/NAME@ALIAS)")
    v = m.group("version")
    return m.group("name"), int(v) if v and v != "latest" else None, m.group("alias")


def _registered_model(client: MlflowClient, name: str, uri: str):
    try:
        with _errors(uri):
            return client.get_registered_model(name)
    except MlflowException as e:
        if "NOT_EXIST" in _code(e):
            raise TrackingError(f"model {name}: not registered in {display_uri(uri)}") from None
        raise


def _all_versions(client: MlflowClient, name: str) -> list[Any]:
    out, token = [], None
    while True:
        page = client.search_model_versions(
            f"name = '{name}'", max_results=1000, page_token=token, order_by=["version_number ASC"]
        )
        out.extend(page)
        token = page.token
        if not token:
            return sorted(out, key=lambda mv: int(mv.version))


def resolve_version(
    name: str, version: str | int | None, *, tracking_uri: str | None = None, store: str | None = None
) -> int:
    """A version number from '3', 3, '@champion', 'champion' (an alias) or None/'latest'."""
    validate_model_name(name)
    uri = resolve_tracking_uri(tracking_uri, store)
    client = _activate(uri)
    rm = _registered_model(client, name, uri)
    if version is None or str(version) == "latest":
        versions = _all_versions(client, name)
        if not versions:
            raise TrackingError(f"model {name}: has no versions")
        return int(versions[-1].version)
    text = str(version).strip()
    if text.isdigit():
        try:
            client.get_model_version(name, text)
        except MlflowException:
            raise TrackingError(f"model {name} version {text}: not found") from None
        return int(text)
    alias = text.lstrip("@")
    aliases = {a: int(v) for a, v in (rm.aliases or {}).items()}
    if alias not in aliases:
        known = ", ".join(f"@{a}" for a in sorted(aliases)) or "none"
        raise TrackingError(f"model {name}: no alias @{alias} (aliases: {known})")
    return aliases[alias]


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _float_or_none(v: Any) -> float | None:
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def find_version(
    name: str, tag: str, value: str, *, tracking_uri: str | None = None, store: str | None = None
) -> int | None:
    """The newest version of model name whose tag equals value, or None (also when the model
    does not exist yet)."""
    uri = resolve_tracking_uri(tracking_uri, store)
    client = _activate(uri)
    try:
        versions = _all_versions(client, name)
    except TrackingError:
        return None
    hits = [int(v.version) for v in versions if (v.tags or {}).get(tag) == value]
    return max(hits) if hits else None


def list_versions(name: str, *, tracking_uri: str | None = None, store: str | None = None) -> dict[str, Any]:
    """The versions of a registered model: version, aliases, dataset, val bpc, created, run."""
    validate_model_name(name)
    uri = resolve_tracking_uri(tracking_uri, store)
    client = _activate(uri)
    rm = _registered_model(client, name, uri)
    by_version: dict[int, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():  # search results carry no aliases: read them here
        by_version.setdefault(int(v), []).append(alias)
    rows = []
    for mv in _all_versions(client, name):
        v = int(mv.version)
        rows.append(
            {
                "version": v,
                "aliases": sorted(by_version.get(v, [])),
                "dataset_id": mv.tags.get("dataset_id"),
                "val_bpc": _float_or_none(mv.tags.get("val_bpc")),
                "step": int(mv.tags["step"]) if str(mv.tags.get("step", "")).isdigit() else None,
                "created": _iso(mv.creation_timestamp),
                "run_id": mv.run_id,
                "status": str(mv.status),
            }
        )
    return {
        "name": name,
        "tracking_uri": display_uri(uri),
        "aliases": {a: int(v) for a, v in sorted((rm.aliases or {}).items())},
        "versions": rows,
    }


def promote(
    name: str,
    version: str | int,
    *,
    alias: str = CHAMPION,
    tracking_uri: str | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """Point alias (default 'champion') at a version; returns the previous holder too."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,255}", alias) or alias.lower() == "latest":
        raise TrackingError(f"alias {alias!r}: use letters, digits, '_' or '-' (and not 'latest')")
    uri = resolve_tracking_uri(tracking_uri, store)
    v = resolve_version(name, version, tracking_uri=uri)
    client = _activate(uri)
    rm = _registered_model(client, name, uri)
    previous = (rm.aliases or {}).get(alias)
    client.set_registered_model_alias(name, alias, str(v))
    return {
        "name": name,
        "alias": alias,
        "version": v,
        "previous": int(previous) if previous is not None else None,
        "changed": previous is None or int(previous) != v,
    }


def alias_version(
    name: str, alias: str = CHAMPION, *, tracking_uri: str | None = None, store: str | None = None
) -> int | None:
    """The version an alias points at, or None if the alias (or the model) does not exist."""
    validate_model_name(name)
    uri = resolve_tracking_uri(tracking_uri, store)
    client = _activate(uri)
    try:
        rm = _registered_model(client, name, uri)
    except TrackingError as e:
        if "not registered" in str(e):
            return None
        raise
    v = (rm.aliases or {}).get(alias)
    return int(v) if v is not None else None


def version_info(
    name: str, version: int, *, tracking_uri: str | None = None, store: str | None = None
) -> dict[str, Any]:
    validate_model_name(name)
    uri = resolve_tracking_uri(tracking_uri, store)
    client = _activate(uri)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise TrackingError(f"model {name} version {version}: not found") from None
    return {"version": int(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags), "source": mv.source}


def _download_model_dir(name: str, version: int, uri: str, dst: str) -> str:
    return mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}",
        dst_path=dst,
        tracking_uri=uri,
        registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri,
    )


def _checkpoint_in(folder: str, label: str) -> str:
    hits = sorted(Path(folder).rglob(CHECKPOINT_FILE))
    if not hits:
        raise TrackingError(f"{label}: the model holds no {CHECKPOINT_FILE} (not a charlm model?)")
    return str(hits[0])


def load_checkpoint_ref(
    ref: str, *, tracking_uri: str | None = None, store: str | None = None
) -> tuple[dict[str, Any], str]:
    """(validated checkpoint dict, label) for models:/NAME/VERSION, models:/NAME@ALIAS,
    runs:/RUN_ID/PATH, a checkpoint file, a training out folder, or a store URL."""
    from charlm import checkpoint

    ref = ref.strip()
    if ref.startswith("models:/"):
        name, version, alias = parse_models_ref(ref)
        uri = resolve_tracking_uri(tracking_uri, store)
        v = resolve_version(name, f"@{alias}" if alias else version, tracking_uri=uri)
        label = f"models:/{name}/{v}" + (f" (@{alias})" if alias else "")
        _activate(uri)
        with tempfile.TemporaryDirectory(prefix="charlm-model-") as tmp:
            folder = _download_model_dir(name, v, uri, tmp)
            ck = checkpoint.load(_checkpoint_in(folder, label), name=label)
        return ck, label
    if ref.startswith("runs:/"):
        uri = resolve_tracking_uri(tracking_uri, store)
        _activate(uri)
        with tempfile.TemporaryDirectory(prefix="charlm-run-") as tmp:
            try:
                got = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tmp, tracking_uri=uri)
            except MlflowException as e:
                raise TrackingError(f"{ref}: {_first_line(e)}") from None
            path = got if os.path.isfile(got) else _checkpoint_in(got, ref)
            ck = checkpoint.load(path, name=ref)
        return ck, ref
    return read_checkpoint(ref), ref


def resolve_model_ref(
    ref: str, device: str = "cpu", *, tracking_uri: str | None = None, store: str | None = None
):
    """(model in eval mode on device, vocab, checkpoint dict, label) for any model reference
    load_checkpoint_ref accepts."""
    from charlm import checkpoint

    ck, label = load_checkpoint_ref(ref, tracking_uri=tracking_uri, store=store)
    model, vocab, ck = checkpoint.load_model(ck, name=label, device=device)
    return model, vocab, ck, label


# -- compare ------------------------------------------------------------------------------------------------------------
def _map_ids(ds_vocab: Vocab, model_vocab: Vocab, ids: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """ids (dataset vocab) as the model's ids, dropping characters it cannot encode; the dropped
    characters with counts."""
    if ds_vocab.chars == model_vocab.chars:
        return ids, {}
    mapping = np.array(
        [model_vocab.index(c) if c in model_vocab else -1 for c in ds_vocab.chars], dtype=np.int64
    )
    mapped = mapping[np.asarray(ids, dtype=np.int64)]
    keep = mapped >= 0
    dropped: dict[str, int] = {}
    if not keep.all():
        values, counts = np.unique(np.asarray(ids)[~keep], return_counts=True)
        dropped = {ds_vocab.chars[int(v)]: int(n) for v, n in zip(values, counts, strict=True)}
    return mapped[keep].astype(model_vocab.dtype), dropped


def compare_versions(
    name: str,
    versions: Sequence[str | int] | None = None,
    *,
    dataset: str | None = None,
    split: str = "test",
    max_chars: int | None = None,
    batch_size: int = 16,
    seq_len: int = 256,
    tracking_uri: str | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """Evaluate versions (numbers or @aliases; default all) on one held-out split of one dataset.

    The dataset is the named one, else the champion's, else the one all the versions were trained
    on. Every version sees the same characters in the same stream layout (fp32, state carried
    across batches); a version whose vocab lacks some characters of the dataset is scored on the
    text with those characters removed, and its entry says how many ('coverage' < 1, a note).
    Results are ranked by bits per character, best first.
    """
    from charlm import checkpoint
    from charlm.datasets import DatasetError, open_dataset
    from charlm.train import evaluate

    validate_model_name(name)
    uri = resolve_tracking_uri(tracking_uri, store)
    client = _activate(uri)
    rm = _registered_model(client, name, uri)
    aliases: dict[int, list[str]] = {}
    for a, v in (rm.aliases or {}).items():
        aliases.setdefault(int(v), []).append(a)
    if versions:
        nums = [resolve_version(name, v, tracking_uri=uri) for v in versions]
    else:
        nums = [int(mv.version) for mv in _all_versions(client, name)]
    nums = list(dict.fromkeys(nums))
    if not nums:
        raise TrackingError(f"model {name}: has no versions to compare")
    infos = {v: version_info(name, v, tracking_uri=uri) for v in nums}

    if dataset is None:
        champ = (rm.aliases or {}).get(CHAMPION)
        champ_ds = (
            version_info(name, int(champ), tracking_uri=uri)["tags"].get("dataset_id") if champ else None
        )
        trained_on = {i["tags"].get("dataset_id") for i in infos.values()}
        if champ_ds:
            dataset = champ_ds
        elif len(trained_on) == 1 and None not in trained_on:
            dataset = trained_on.pop()
        else:
            raise TrackingError(
                f"model {name}: versions {', '.join(map(str, nums))} record no common dataset; pass --dataset ID"
            )
    try:
        ds = open_dataset(dataset, store)
    except (DatasetError, OSError) as e:
        raise TrackingError(f"dataset {dataset}: {_first_line(e)}") from None
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

    results, notes = [], []
    for v in nums:
        with tempfile.TemporaryDirectory(prefix="charlm-compare-") as tmp:
            folder = _download_model_dir(name, v, uri, tmp)
            ck = checkpoint.load(_checkpoint_in(folder, f"models:/{name}/{v}"), name=f"models:/{name}/{v}")
        model, vocab, _ = checkpoint.load_model(ck, name=f"models:/{name}/{v}", device="cpu")
        mapped, dropped = _map_ids(ds.vocab, vocab, ids)
        skipped = sum(dropped.values())
        entry: dict[str, Any] = {
            "version": v,
            "aliases": sorted(aliases.get(v, [])),
            "trained_on": infos[v]["tags"].get("dataset_id"),
            "registered_val_bpc": _float_or_none(infos[v]["tags"].get("val_bpc")),
            "chars": len(ids),
            "chars_skipped": skipped,
            "coverage": (len(ids) - skipped) / len(ids),
            "same_vocab": ds.vocab.chars == vocab.chars,
        }
        if len(mapped) < 2:
            entry.update(loss=None, bpc=None, chars_scored=0)
            notes.append(
                f"version {v}: its vocab encodes none of the {split} text of dataset {ds.id}; not scored"
            )
        else:
            loss, n = evaluate(model, mapped, batch_size, seq_len, device="cpu", precision="fp32")
            entry.update(loss=loss, bpc=loss / LN2, chars_scored=n)
            if skipped:
                shown = ", ".join(repr(c) for c in sorted(dropped, key=lambda c: -dropped[c])[:8])
                notes.append(
                    f"version {v}: vocab differs from dataset {ds.id}; scored only on text it can encode "
                    f"({skipped} of {len(ids)} characters removed: {shown})"
                )
        results.append(entry)
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
    uri = resolve_tracking_uri(tracking_uri, store)
    client = _activate(uri)
    exp_id = ensure_experiment(client, EVALUATION_EXPERIMENT, uri, store)
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
