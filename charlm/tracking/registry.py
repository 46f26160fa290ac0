"""The model registry: a checkpoint registered as a version of a pyfunc model (the code in
mlflow_model.py beside this file), versions listed and found, aliases moved, model references
(models:/, runs:/, paths, store URLs) resolved to checkpoints."""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from charlm import __version__
from charlm.config import SamplingParams
from charlm.errors import first_line
from charlm.refs import (
    CheckpointRef,
    MlflowRunRef,
    ModelRef,
    RegistryRef,
    load_checkpoint,
    parse_models_uri,
    resolve_model,
)
from charlm.tracking.redact import _clip, _str, redact
from charlm.tracking.session import (
    _MAX_TAG,
    TrackingError,
    TrackingSession,
    _code,
    _keep_env,
    _registry_uri,
)
from charlm.train import LN2

CHAMPION = "champion"
MODEL_ARTIFACT = "model"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_CODE = str(Path(__file__).with_name("mlflow_model.py"))

# The registered model's params and their defaults (the pyfunc's signature is built from these):
# SamplingParams' (no stop is "": a signature param needs a typed default, not None) plus the
# pyfunc's own num_samples and precision.
PARAM_DEFAULTS: dict[str, Any] = {
    **{k: "" if v is None else v for k, v in SamplingParams().to_dict().items()},
    "num_samples": 1,
    "precision": "auto",
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_model_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise TrackingError(
            f"model name {name!r}: use letters, digits, '.', '_' or '-' (no '/', '@' or spaces), "
            "starting with a letter or digit"
        )
    return name


# -- registering ---------------------------------------------------------------------------------------------------
def _signature():
    """Every param with its type and default (PARAM_DEFAULTS), and the output: one string per
    stream. The input (prompt strings, see mlflow_model.py) is not declared as a schema: MLflow
    enforces an input schema before the model sees the input, turning a list into a one-column
    frame, dropping every column but the first of an unnamed one (so {x, prompt} was read as x)
    or refusing a list for a named one, in its own words. The model checks the input itself
    (charlm.tracking.serving) and the logged input example shows the payload."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double", str: "string", bool: "boolean"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in PARAM_DEFAULTS.items()])
    return ModelSignature(inputs=None, outputs=Schema([ColSpec("string")]), params=params)


def _input_example(ck: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A request this model answers: one prompt its vocabulary encodes, two short samples."""
    import pandas as pd

    from charlm.tracking.serving import example_prompt
    from charlm.vocab import Vocab

    prompt = example_prompt(Vocab.from_dict(ck["vocab"]))
    return pd.DataFrame({"prompt": [prompt]}), {"length": 40, "num_samples": 2, "seed": 1}


def _requirements() -> list[str]:
    import torch

    return [
        f"charlm=={__version__}",
        f"torch=={str(torch.__version__).split('+')[0]}",
        f"numpy=={np.__version__}",
        f"mlflow=={mlflow.__version__}",
        "pandas",
    ]


def read_checkpoint(ref: str | CheckpointRef) -> dict[str, Any]:
    """A validated checkpoint dict from a checkpoint file, a run folder (its best checkpoint) or
    their store URLs, resolved by charlm.refs."""
    got = resolve_model(ref)
    if not isinstance(got, CheckpointRef):
        raise TrackingError(
            f"{got.label}: want a checkpoint file or run folder here, not a registry reference"
        )
    return load_checkpoint(got)


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
    validate_model_name(name)
    return _register(
        TrackingSession.open(tracking_uri, store),
        checkpoint_ref,
        name,
        run_id=run_id,
        dataset_id=dataset_id,
        tags=tags,
        await_seconds=await_seconds,
    )


def _register(
    s: TrackingSession,
    checkpoint_ref: str,
    name: str,
    *,
    run_id: str,
    dataset_id: str | None = None,
    tags: dict[str, Any] | None = None,
    await_seconds: int = 300,
) -> dict[str, Any]:
    """register_checkpoint in session s."""
    from mlflow.models import Model

    from charlm import checkpoint

    validate_model_name(name)
    ck = read_checkpoint(checkpoint_ref)
    client = s.pin()  # the fluent calls below resolve against MLflow's globals
    try:
        with s.errors():
            run = client.get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"run {run_id}: not found in {s.shown}") from e
    slim = {**ck, "optimizer": None, "train_state_dict": None, "carry": None, "rng": {}}
    version_tags = _version_tags(ck, dataset_id or run.data.tags.get("dataset_id"), tags)
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
                input_example=_input_example(slim),
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


def _version_tags(ck: dict[str, Any], dataset_id: str | None, tags: dict[str, Any] | None) -> dict[str, str]:
    """A new version's tags: step, versions, vocab size, dataset, val loss/bpc, fingerprint, tags."""
    loss = ck.get("best_val_loss") if ck.get("best_val_loss") is not None else ck.get("val_loss")
    version_tags: dict[str, Any] = {
        "step": int(ck["step"]),
        "charlm_version": str(ck.get("charlm_version", __version__)),
        "vocab_size": len(ck["vocab"]["codepoints"]),
    }
    if dataset_id:
        version_tags["dataset_id"] = dataset_id
    if loss is not None:
        version_tags["val_loss"] = f"{float(loss):.6f}"
        version_tags["val_bpc"] = f"{float(loss) / LN2:.6f}"
    if ck.get("corpus_fingerprint"):
        version_tags["corpus_fingerprint"] = ck["corpus_fingerprint"]
    version_tags.update(tags or {})
    return {k: _clip(redact(_str(v)), _MAX_TAG) for k, v in version_tags.items()}


# -- the registry: refs, list, promote -------------------------------------------------------------------------------
def parse_models_ref(ref: str) -> tuple[str, int | None, str | None]:
    """(name, version, alias) of 'models:/NAME/VERSION', 'models:/NAME/latest' (version None,
    alias None) or 'models:/NAME@ALIAS'."""
    r = parse_models_uri(ref)
    return r.name, r.version, r.alias


def _registered_model(s: TrackingSession, name: str):
    try:
        with s.errors():
            return s.client.get_registered_model(name)
    except MlflowException as e:
        if "NOT_EXIST" in _code(e):
            raise TrackingError(f"model {name}: not registered in {s.shown}") from None
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
    return _resolve_version(TrackingSession.open(tracking_uri, store), name, version)


def _resolve_version(s: TrackingSession, name: str, version: str | int | None) -> int:
    """resolve_version in session s."""
    validate_model_name(name)
    rm = _registered_model(s, name)
    if version is None or str(version) == "latest":
        versions = _all_versions(s.client, name)
        if not versions:
            raise TrackingError(f"model {name}: has no versions")
        return int(versions[-1].version)
    text = str(version).strip()
    if text.isdigit():
        try:
            s.client.get_model_version(name, text)
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
    s = TrackingSession.open(tracking_uri, store)
    try:
        versions = _all_versions(s.client, name)
    except TrackingError:
        return None
    hits = [int(v.version) for v in versions if (v.tags or {}).get(tag) == value]
    return max(hits) if hits else None


def _aliases_by_version(rm: Any) -> dict[int, list[str]]:
    """The aliases of a registered model, grouped by the version they point at."""
    by_version: dict[int, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():  # search results carry no aliases: read them here
        by_version.setdefault(int(v), []).append(alias)
    return by_version


def list_versions(name: str, *, tracking_uri: str | None = None, store: str | None = None) -> dict[str, Any]:
    """The versions of a registered model: version, aliases, dataset, val bpc, created, run."""
    validate_model_name(name)
    s = TrackingSession.open(tracking_uri, store)
    rm = _registered_model(s, name)
    by_version = _aliases_by_version(rm)
    rows = []
    for mv in _all_versions(s.client, name):
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
        "tracking_uri": s.shown,
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
    s = TrackingSession.open(tracking_uri, store)
    v = _resolve_version(s, name, version)
    rm = _registered_model(s, name)
    previous = (rm.aliases or {}).get(alias)
    s.client.set_registered_model_alias(name, alias, str(v))
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
    s = TrackingSession.open(tracking_uri, store)
    try:
        rm = _registered_model(s, name)
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
    return _version_info(TrackingSession.open(tracking_uri, store), name, version)


def _version_info(s: TrackingSession, name: str, version: int) -> dict[str, Any]:
    """version_info in session s."""
    try:
        mv = s.client.get_model_version(name, str(version))
    except MlflowException:
        raise TrackingError(f"model {name} version {version}: not found") from None
    return {"version": int(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags), "source": mv.source}


# -- model references -> checkpoints ------------------------------------------------------------------------------------
def _download_model_dir(s: TrackingSession, name: str, version: int, dst: str) -> str:
    return mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}",
        dst_path=dst,
        tracking_uri=s.uri,
        registry_uri=_registry_uri(s.uri),
    )


def _checkpoint_in(folder: str, label: str) -> str:
    hits = sorted(Path(folder).rglob(CHECKPOINT_FILE))
    if not hits:
        raise TrackingError(f"{label}: the model holds no {CHECKPOINT_FILE} (not a charlm model?)")
    return str(hits[0])


def load_checkpoint_ref(
    ref: str | ModelRef, *, tracking_uri: str | None = None, store: str | None = None
) -> tuple[dict[str, Any], str]:
    """(validated checkpoint dict, label) for any model reference charlm.refs resolves:
    models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH, a checkpoint file, a run folder,
    or their store URLs."""
    from charlm import checkpoint

    got = resolve_model(ref, store)
    if isinstance(got, RegistryRef):
        s = TrackingSession.open(tracking_uri, store)
        v = _resolve_version(s, got.name, f"@{got.alias}" if got.alias else got.version)
        label = f"models:/{got.name}/{v}" + (f" (@{got.alias})" if got.alias else "")
        with tempfile.TemporaryDirectory(prefix="charlm-model-") as tmp:
            folder = _download_model_dir(s, got.name, v, tmp)
            ck = checkpoint.load(_checkpoint_in(folder, label), name=label)
        return ck, label
    if isinstance(got, MlflowRunRef):
        s = TrackingSession.open(tracking_uri, store)
        with tempfile.TemporaryDirectory(prefix="charlm-run-") as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=got.uri, dst_path=tmp, tracking_uri=s.uri
                )
            except MlflowException as e:
                raise TrackingError(f"{got.uri}: {first_line(e)}") from None
            path = path if os.path.isfile(path) else _checkpoint_in(path, got.uri)
            ck = checkpoint.load(path, name=got.uri)
        return ck, got.uri
    return load_checkpoint(got), ref.strip() if isinstance(ref, str) else got.label


def resolve_model_ref(
    ref: str | ModelRef, device: str = "cpu", *, tracking_uri: str | None = None, store: str | None = None
):
    """(model in eval mode on device, vocab, checkpoint dict, label) for any model reference
    load_checkpoint_ref accepts."""
    from charlm import checkpoint

    ck, label = load_checkpoint_ref(ref, tracking_uri=tracking_uri, store=store)
    model, vocab, ck = checkpoint.load_model(ck, name=label, device=device)
    return model, vocab, ck, label
