"""One sweep trial inside Ray Tune: the one training loop (charlm.train.train) with a callback that
reports every evaluation to Tune (metrics + a checkpoint, so ASHA can stop the trial and a restored
sweep resumes it) and charlm's MLflow callback logging into the trial's child run (rank 0: a trial
is one process)."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from charlm import runs
from charlm.config import TrainConfig
from charlm.train import Callback, Run, limit_reached

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "charlm.sweep"  # the sweep's name, on the parent and every child
TRIAL_TAG = "charlm.sweep.trial_id"
ENDED_TAG = "charlm.sweep.ended"  # completed | stopped by the scheduler at step S | failed: ...
ROLE_TAG = "charlm.sweep.role"  # parent | trial


@dataclass(frozen=True)
class TrialSetup:
    """What every trial gets besides its sampled fields: plain values (it travels through Ray)."""

    base_config: dict[str, Any]
    sweep_name: str
    data_spec: dict[str, Any]  # charlm.distributed.DataSpec as a dict
    payload: Any  # (vocab dict, splits) of a raw corpus; None for a dataset
    threads: int = 1
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    child_tags: dict[str, str] = field(default_factory=dict)
    sample_length: int = 200


class TuneReporter(Callback):
    """Reports each evaluation to Tune with the run's checkpoint (charlm's schema, checkpoint.pt).
    `completed` is true on the evaluation the run's own limit ended it with; the driver tells a
    trial the scheduler stopped from one that ran to its end by it."""

    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        self.extra = dict(extra or {})
        self.last_train_loss: float | None = None

    def on_log(self, run: Run, metrics: dict[str, Any]) -> None:
        self.last_train_loss = metrics.get("train_loss")

    def on_eval(self, run: Run, metrics: dict[str, Any]) -> None:
        from ray import tune

        from charlm import checkpoint as ckpt_mod

        done = limit_reached(run.config, run.step, run.epoch_float, run.train_seconds) is not None
        out = {
            "step": run.step,
            "epoch": metrics["epoch"],
            "val_loss": metrics["val_loss"],
            "val_bpc": metrics["val_bpc"],
            "best_val_loss": run.best_val_loss,
            "train_loss": self.last_train_loss,
            "train_seconds": run.train_seconds,
            "completed": done,
            **self.extra,
        }
        with tempfile.TemporaryDirectory(prefix="charlm-trial-") as d:
            ckpt_mod.save(run.checkpoint(), os.path.join(d, runs.CKPT_FILE))
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))


def _load_data(setup: TrialSetup):
    spec = setup.data_spec
    if spec["kind"] == "dataset":
        from charlm import datasets

        ds = datasets.load(spec["url"])
        return ds.vocab, ds.splits, ds.fingerprint, spec["label"]
    from charlm.vocab import Vocab

    vocab_d, splits = setup.payload
    return Vocab.from_dict(vocab_d), splits, spec["fingerprint"], spec["label"]


def _restored() -> dict[str, Any] | None:
    """The checkpoint Tune restored this trial from (a restored sweep, a retried trial), else None."""
    from ray import tune

    from charlm import checkpoint as ckpt_mod

    found = tune.get_checkpoint()
    if found is None:
        return None
    with found.as_directory() as d:
        return ckpt_mod.load(os.path.join(d, runs.CKPT_FILE), name=f"{found.path}/{runs.CKPT_FILE}")


def _finished(cfg: TrainConfig, ck: dict[str, Any], splits: dict[str, Any], label: str) -> bool:
    """Whether a restored checkpoint is already at the run's end by charlm.train's own stop rule
    (the driver died after the trial's last report, before Tune recorded it as finished)."""
    from charlm.data import StreamBatcher, check_sizes

    batch_size, _ = check_sizes(splits, cfg.batch_size, cfg.seq_len, auto_shrink=cfg.auto_shrink, name=label)
    bpe = StreamBatcher(splits["train"], batch_size, cfg.seq_len, seed=cfg.seed).batches_per_epoch(
        int(ck["epoch"])
    )
    epoch = int(ck["epoch"]) + int(ck["batch_in_epoch"]) / max(1, bpe)
    return limit_reached(cfg, int(ck["step"]), epoch, float(ck.get("train_seconds", 0.0))) is not None


def _child_run_id(setup: TrialSetup, trial_id: str) -> str | None:
    """The child run an earlier attempt of this trial opened (a restored sweep), if any."""
    from charlm.tracking import TrackingSession

    s = TrackingSession.open(setup.tracking_uri)
    exp = s.client.get_experiment_by_name(setup.experiment) if setup.experiment else None
    if exp is None:
        return None
    found = s.client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{setup.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune's function trainable: config {"train": {field: value}} over setup.base_config."""
    import torch
    from ray import tune

    from charlm.train import train

    torch.set_num_threads(max(1, int(setup.threads)))
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)  # a line per checkpoint otherwise
    cfg = TrainConfig.from_dict({**setup.base_config, **config["train"]})
    vocab, splits, fp, label = _load_data(setup)
    resume = _restored()
    if resume is not None and _finished(cfg, resume, splits, label):
        return  # its last report (completed) stands; the driver ends its child run
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    callbacks: list[Callback] = []
    extra = {"trial_id": trial_id}
    if setup.parent_run_id is None:
        train(
            cfg,
            vocab,
            splits,
            callbacks=[TuneReporter(extra)],
            resume=resume,
            corpus_fingerprint=fp,
            corpus_name=label,
        )
        return
    from charlm.tracking import TrackingCallback, start_run

    tags = {
        **setup.child_tags,
        PARENT_TAG: setup.parent_run_id,
        SWEEP_TAG: setup.sweep_name,
        TRIAL_TAG: trial_id,
        ROLE_TAG: "trial",
    }
    previous = _child_run_id(setup, trial_id)
    with start_run(
        tracking_uri=setup.tracking_uri,
        experiment=setup.experiment,
        run_name=f"{setup.sweep_name}/{ctx.get_trial_name()}",
        tags=tags,
        resume_run_id=previous,
        attempt=2 if previous else 1,
    ) as child:
        extra["mlflow_run_id"] = child.run_id
        tracker = TrackingCallback(
            child.tracking_uri, child.run_id, temperatures=(0.8,), sample_length=setup.sample_length
        )
        callbacks = [tracker, TuneReporter(extra)]  # MLflow has each evaluation before Tune sees it
        train(
            cfg, vocab, splits, callbacks=callbacks, resume=resume, corpus_fingerprint=fp, corpus_name=label
        )
