"""Where MLflow lives: the tracking URI (resolved once per public entry point), MLflow's
process-global URIs pinned to it, the client, unreachable-server errors as one line, experiments,
and the redacted writes every run and version goes through."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from charlm import storage
from charlm.tracking import sqlite_store
from charlm.tracking.redact import _clip, _str, display_uri, redact, redact_obj

_MAX_TAG = 5000  # MLflow limits tag values to 8000 characters, params to 6000
_MAX_PARAM = 5000


class TrackingError(ValueError):
    """A tracking/registry request that cannot be done; one line naming the model, run or URI."""


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
    root = storage.Store.at(store).mlflow_artifacts()
    local = storage.local_path(root)
    return Path(local).as_uri() if local is not None else root


def is_server(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks")


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


def _registry_uri(uri: str) -> str:
    """A registry URI the user set in $MLFLOW_REGISTRY_URI wins, as in MLflow."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or uri


def _pin(uri: str) -> str:
    """Point MLflow's process-global tracking and registry URIs at uri; the registry URI."""
    registry = _registry_uri(uri)
    with _keep_env():
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(registry)
    return registry


def _prepare(uri: str) -> None:
    """A sqlite database (tracking, and a registry of its own) created and migrated under a file
    lock before MLflow touches it, in WAL mode; a half-migrated one refused in one line (see
    sqlite_store). Nothing for a server or another database."""
    for u in dict.fromkeys((uri, _registry_uri(uri))):
        try:
            sqlite_store.prepare(u)
        except sqlite_store.SqliteStoreError as e:
            raise TrackingError(str(e)) from None


def _activate(uri: str) -> MlflowClient:
    """The sqlite database ready (see _prepare), MLflow's globals pinned to uri (see _pin); a
    client for it."""
    _prepare(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=_pin(uri))


@dataclass(frozen=True)
class TrackingSession:
    """One tracking URI and its client, made once per public entry point (open): MLflow's
    process-global URIs (what fluent and models:/ APIs resolve against) are pinned to it then,
    and again by pin() after code that may have moved them (a training block)."""

    uri: str
    client: MlflowClient

    @classmethod
    def open(cls, tracking_uri: str | None = None, store: str | None = None) -> TrackingSession:
        """The session for a tracking_uri/store argument pair (see resolve_tracking_uri)."""
        return cls.at(resolve_tracking_uri(tracking_uri, store))

    @classmethod
    def at(cls, uri: str) -> TrackingSession:
        """The session for an already resolved URI."""
        return cls(uri, _activate(uri))

    @property
    def shown(self) -> str:
        """The URI as it may be shown (no credentials)."""
        return display_uri(self.uri)

    def pin(self) -> MlflowClient:
        """MLflow's globals back on this URI; the client."""
        _pin(self.uri)
        return self.client

    def errors(self) -> contextlib.AbstractContextManager[None]:
        """Unreachable-server errors as one TrackingError line naming the URI."""
        return _errors(self.uri)


def activate(tracking_uri: str | None = None, store: str | None = None) -> str:
    """Pin MLflow's process-global tracking and registry URIs (what mlflow.pyfunc.load_model
    resolves models:/ against) to the resolved URI; returns it."""
    return TrackingSession.open(tracking_uri, store).uri


def _code(e: MlflowException) -> str:
    return str(getattr(e, "error_code", "") or "")


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


def ensure_experiment(session: TrackingSession, name: str, store: str | None = None) -> str:
    """The id of the experiment called name, created (artifacts in the store) if missing."""
    client = session.client
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None if is_server(session.uri) else artifact_root(store)
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
            f"experiment {name!r} is deleted in {session.shown}; restore it or choose another experiment"
        )
    return exp.experiment_id


# -- writing to a run -------------------------------------------------------------------------------------
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
