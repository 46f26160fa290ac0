"""The sweep driver: Ray Tune over TrainConfig (charlm.sweep.space), one MLflow parent run with a
child run per trial (charlm.sweep.trial), the comparison (charlm.sweep.report) and the winner
registered.

The sweep folder is `<store>/runs/sweeps/<name>/`: Tune's experiment (its state and every trial's
checkpoints) plus charlm's `sweep.json` (the parameters and the parent MLflow run, written before
any trial) and `summary.json` (written last, when the sweep is done). The name is derived from the
parameters, so the same command continues a killed sweep (finished trials kept, unfinished ones
resumed from their last checkpoint) and, once the sweep is done, returns its summary again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Any

from charlm import refs, runs, storage
from charlm.config import TrainConfig
from charlm.distributed.driver import ray_storage
from charlm.sweep import report
from charlm.sweep.space import Space
from charlm.sweep.trial import TrialSetup, run_trial

log = logging.getLogger("charlm.sweep")

SWEEP_FILE = "sweep.json"
SCHEDULERS = ("asha", "fifo")
REGISTER_TAGS = ("charlm.sweep", "charlm.sweep.parent_run_id", "charlm.sweep.rank", "charlm.sweep.trial_id")


class SweepError(RuntimeError):
    """A sweep that cannot start or finish; one line naming the sweep (folder) and the problem."""


def derive_sweep_name(key: dict[str, Any], data_id: str) -> str:
    """A pure function of what decides the sweep: the same command gets the same name."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return f"sweep-{data_id[:8]}-{h[:12]}"


def sweep_folder(name: str, store: str | None = None) -> str:
    return storage.Store.at(store).runs("sweeps", runs.check_run_name(name))


def _scheduler(kind: str, base: TrainConfig, grace_period: int, reduction_factor: float) -> Any:
    """ASHA on val loss, one rung unit per evaluation (Tune's training_iteration), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if kind == "fifo":
        return FIFOScheduler()
    max_t = math.ceil(base.max_steps / base.eval_every) if base.max_steps else 10_000
    return ASHAScheduler(
        time_attr="training_iteration",
        metric="val_loss",
        mode="min",
        max_t=max(max_t, grace_period),
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )


def _check_same(record: dict[str, Any], key: dict[str, Any], folder: str) -> None:
    if record.get("key") != json.loads(json.dumps(key, default=str)):
        raise SweepError(
            f"{folder}: sweep was started with other parameters; rerun it with the same ones or choose another --name"
        )


def _check_args(
    space: Space,
    trials: int | None,
    scheduler: str,
    grace_period: int,
    reduction_factor: float,
    register: str | None,
    track: bool,
) -> int:
    """The sweep's options checked before anything starts; the number of samples."""
    if scheduler not in SCHEDULERS:
        raise SweepError(f"scheduler {scheduler!r}: want one of {', '.join(SCHEDULERS)}")
    if register is not None and not track:
        raise SweepError(f"--register {register}: needs MLflow (drop --no-track)")
    if grace_period < 1 or reduction_factor <= 1:
        raise SweepError("--grace-period must be >= 1 and --reduction-factor > 1")
    num_samples = trials if trials is not None else (1 if not space.has_random else 4)
    if num_samples < 1:
        raise SweepError(f"--trials {num_samples}: must be at least 1")
    if register is not None:
        from charlm.tracking import validate_model_name

        validate_model_name(register)
    return num_samples


def _write_record(folder: str, name: str, corpus: str, key: dict[str, Any], parent: Any) -> None:
    """sweep.json: the parameters and the parent MLflow run, before any trial starts."""
    record = {
        "format": 1,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "corpus": corpus,
        "key": json.loads(json.dumps(key, default=str)),
        "parent_run_id": parent.run_id if parent else None,
        "tracking_uri": parent.shown_uri if parent else None,
    }
    runs.write_json(folder, SWEEP_FILE, record, indent=1)


# ~90 lines: the sweep's steps (name, resume, Tuner, parent run, trials, winner, publish) in the
# order they happen; each is a call, the length is the sequence.
def run_sweep(
    corpus: str | refs.DataRef,
    base: TrainConfig,
    space: Space,
    *,
    trials: int | None = None,
    scheduler: str = "asha",
    grace_period: int = 1,
    reduction_factor: float = 2.0,
    register: str | None = None,
    store: str | None = None,
    name: str | None = None,
    track: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    cpus_per_trial: float = 1.0,
    max_failures: int = 1,
) -> dict[str, Any]:
    """Run the sweep (or continue it, or return it if it is done); a JSON-able summary with every
    trial (ranked by best val loss), the winner and its registered version."""
    from charlm.distributed import ensure_ray, resolve_data

    num_samples = _check_args(space, trials, scheduler, grace_period, reduction_factor, register, track)
    root = storage.store_root(store)
    data_ref = refs.resolve_data(corpus, root)
    spec, payload = resolve_data(data_ref, base, root)
    key = {
        "base": base.to_dict(),
        "space": space.to_dict(),
        "data": spec.id,
        "trials": num_samples,
        "scheduler": scheduler,
        "grace_period": grace_period,
        "reduction_factor": reduction_factor,
        "register": register,
    }
    name = runs.check_run_name(name) if name else derive_sweep_name(key, spec.id)
    folder = sweep_folder(name, root)
    record = runs.read_json(folder, SWEEP_FILE)
    if record is not None:
        _check_same(record, key, folder)
        done = runs.read_json(folder, runs.SUMMARY_FILE)
        if done is not None:
            log.warning("sweep %s already finished (%s); not running it again", name, folder)
            return {**done, "already_finished": True}
        log.warning("continuing sweep %s from %s", name, folder)

    ensure_ray()
    parent = None
    if track:
        from charlm.sweep import tracking as sweep_tracking

        parent = sweep_tracking.open_parent(
            record, name, folder, data_ref, root, tracking_uri, experiment, space, key
        )
    if record is None or (parent is not None and record.get("parent_run_id") != parent.run_id):
        _write_record(folder, name, data_ref.given, key, parent)

    setup = TrialSetup(
        base_config=base.to_dict(),
        sweep_name=name,
        data_spec=spec.__dict__.copy(),
        payload=payload,
        threads=max(1, int(cpus_per_trial)),
        child_tags={"dataset_id": spec.id} if spec.kind == "dataset" else {},
        **(parent.trial_fields() if parent else {}),
    )
    t0 = time.perf_counter()
    try:
        results = _fit(setup, space, root, name, key, base, cpus_per_trial, max_failures)
        trials_out = report.collect(results, root)
        summary = {
            "sweep": name,
            "sweep_url": folder,
            "corpus": spec.label,
            "dataset_id": spec.id if spec.kind == "dataset" else None,
            "space": space.to_dict(),
            "scheduler": scheduler,
            "trials": trials_out,
            "winner": next((t for t in trials_out if t["rank"] == 1), None),
            "fit_seconds": time.perf_counter() - t0,
        }
        if parent is not None:
            summary["mlflow"] = parent.finish(summary, register)
    except BaseException as e:
        if parent is not None:
            parent.fail(e)
        raise
    runs.write_summary(folder, summary, indent=1)
    return summary


def _fit(
    setup: TrialSetup,
    space: Space,
    root: str,
    name: str,
    key: dict[str, Any],
    base: TrainConfig,
    cpus_per_trial: float,
    max_failures: int,
) -> Any:
    """Tune's ResultGrid: a new Tuner, or the one in the sweep folder restored (finished trials
    kept, unfinished and errored ones resumed from their last checkpoint)."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": cpus_per_trial})
    folder = sweep_folder(name, root)
    storage_path, fs = ray_storage(storage.Store.at(root).runs("sweeps"))
    tune_path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(
            tune_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space.tune_space(),
            tune_config=tune.TuneConfig(
                num_samples=key["trials"],
                scheduler=_scheduler(key["scheduler"], base, key["grace_period"], key["reduction_factor"]),
                **({"metric": "val_loss", "mode": "min"} if key["scheduler"] == "fifo" else {}),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=fs,
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
                ),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                verbose=0,
            ),
        )
    # Tune's console table goes to stderr: stdout carries --json. Its warning that checkpoints
    # every evaluation snapshot the experiment often is what a resumable sweep wants.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return tuner.fit()
    except Exception as e:
        raise SweepError(
            f"sweep {name} failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; "
            f"its state is kept in {folder}: run the same command again to continue"
        ) from e
