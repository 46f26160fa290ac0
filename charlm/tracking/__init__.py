"""MLflow adapter: tracked runs, registered versions, comparison and promotion by alias.

The only charlm package that imports mlflow. Everything takes an explicit tracking URI or derives
it here (session.resolve_tracking_uri):

* ``MLFLOW_TRACKING_URI`` when set (a tracking server, or a database URI);
* otherwise ``sqlite:///<store>/mlflow.db`` beside a local store, or a per-store database under
  ``~/.charlm/mlflow/`` for a remote store. Never the working directory.

Artifacts of a new experiment go to ``<store>/mlflow-artifacts`` (a folder or an S3 prefix) unless
the tracking URI is a server, which then decides (``mlflow server --artifacts-destination``).

Modules:

* ``redact``: :func:`redact`; every string that goes into a param, tag or text artifact passes it
  first (URL passwords, signed-URL query values, the values of secret-looking environment
  variables).
* ``session``: the tracking URI and :class:`TrackingSession`, the URI and its MlflowClient, made
  once per public function from its tracking_uri/store arguments. MLflow keeps process-global
  state (tracking/registry URI, active experiment); a session pins it to its URI before
  fluent/registry APIs are used, so use one tracking URI per process at a time.
* ``lineage``: the dataset (and git commit) a run records.
* ``runs``: :func:`start_run` (a context manager) creates a run with the dataset lineage (tags,
  params, manifest artifact) and ends it FINISHED, or FAILED when the block raises (KILLED on
  Ctrl-C); :func:`tracked_training` runs any training function inside one, plus registration.
  The MLflow run of a run folder is recorded there (``mlflow-run.json``), so a rerun after a
  killed driver continues it (:class:`TrainingTracker`).
* ``callback``: :class:`TrackingCallback`, the training loop's hook; logs on rank 0 only: params
  (config, scaling, precision, versions), metrics per log/eval step, and at the end vocab, metrics
  JSON, loss curve and a temperature sweep of samples. Built from plain strings, so it pickles
  into a Ray worker and works there.
* ``registry``: :func:`register_checkpoint` (a checkpoint becomes a new version of a registered
  pyfunc model, ``mlflow_model.py``, with dataset id and val bpc as version tags),
  :func:`list_versions`, :func:`promote`, :func:`resolve_model_ref`.
* ``compare``: :func:`compare_versions` (the scoring is charlm.scoring) and
  :func:`log_evaluation`.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is for --json
# MLflow's default retries an unreachable server for about four minutes; about 10 s is enough to
# ride out a restart, and the training callback keeps metrics buffered across longer outages.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

from charlm.tracking.callback import (
    SAMPLE_TEMPERATURES,
    TrackingCallback,
    callback_factory,
    sweep_html,
    sweep_markdown,
)
from charlm.tracking.compare import EVALUATION_EXPERIMENT, compare_versions, log_evaluation
from charlm.tracking.lineage import DatasetInfo, describe_dataset, git_commit
from charlm.tracking.redact import REDACTED, display_uri, redact, redact_obj
from charlm.tracking.registry import (
    CHAMPION,
    CHECKPOINT_FILE,
    MODEL_ARTIFACT,
    MODEL_CODE,
    PARAM_DEFAULTS,
    alias_version,
    find_version,
    list_versions,
    load_checkpoint_ref,
    parse_models_ref,
    promote,
    read_checkpoint,
    register_checkpoint,
    resolve_model_ref,
    resolve_version,
    validate_model_name,
    version_info,
)
from charlm.tracking.runs import (
    DEFAULT_EXPERIMENT,
    EXPERIMENT_ENV,
    RUN_FILE,
    TrackedRun,
    TrainingTracker,
    start_run,
    tracked_training,
)
from charlm.tracking.session import (
    TrackingError,
    TrackingSession,
    _activate,
    _log_text,
    activate,
    artifact_root,
    ensure_experiment,
    is_server,
    is_unreachable,
    resolve_tracking_uri,
)
from charlm.train import Callback

__all__ = [
    "CHAMPION",
    "CHECKPOINT_FILE",
    "DEFAULT_EXPERIMENT",
    "EVALUATION_EXPERIMENT",
    "EXPERIMENT_ENV",
    "MODEL_ARTIFACT",
    "MODEL_CODE",
    "PARAM_DEFAULTS",
    "REDACTED",
    "RUN_FILE",
    "SAMPLE_TEMPERATURES",
    "Callback",
    "DatasetInfo",
    "TrackedRun",
    "TrackingCallback",
    "TrackingError",
    "TrackingSession",
    "TrainingTracker",
    "_activate",
    "_log_text",
    "activate",
    "alias_version",
    "artifact_root",
    "callback_factory",
    "compare_versions",
    "describe_dataset",
    "display_uri",
    "ensure_experiment",
    "find_version",
    "git_commit",
    "is_server",
    "is_unreachable",
    "list_versions",
    "load_checkpoint_ref",
    "log_evaluation",
    "parse_models_ref",
    "promote",
    "read_checkpoint",
    "redact",
    "redact_obj",
    "register_checkpoint",
    "resolve_model_ref",
    "resolve_tracking_uri",
    "resolve_version",
    "start_run",
    "sweep_html",
    "sweep_markdown",
    "tracked_training",
    "validate_model_name",
    "version_info",
]
