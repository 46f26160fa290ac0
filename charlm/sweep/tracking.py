"""The sweep in MLflow (through charlm.tracking): one parent run per sweep holding the space, the
scheduler, the winner and the comparison; the trials' child runs (opened by the trials, tagged
mlflow.parentRunId) ended with how each trial ended; the winner's best checkpoint registered as a
new version tagged with the sweep's parent run and its rank. No alias is moved: promotion stays
behind the evaluate flow's gate."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from charlm import refs
from charlm.sweep import report
from charlm.sweep.space import Space
from charlm.sweep.trial import ENDED_TAG, PARENT_TAG, ROLE_TAG, SWEEP_TAG

log = logging.getLogger("charlm.sweep")

ERROR_TAG = "charlm.error"
RANK_TAG = "charlm.sweep.rank"


@dataclass
class Parent:
    """The sweep's open parent run; finish() or fail() ends it."""

    tracked: Any  # charlm.tracking.TrackedRun
    experiment: str
    stack: contextlib.ExitStack = field(repr=False)

    @property
    def run_id(self) -> str:
        return self.tracked.run_id

    @property
    def uri(self) -> str:
        return self.tracked.tracking_uri

    @property
    def shown_uri(self) -> str:
        return self.tracked.info()["tracking_uri"]

    def trial_fields(self) -> dict[str, Any]:
        """What a trial needs to open its child run under this parent (TrialSetup's fields)."""
        return {"tracking_uri": self.uri, "experiment": self.experiment, "parent_run_id": self.run_id}

    def fail(self, e: BaseException) -> None:
        """End the parent FAILED (KILLED on Ctrl-C) with the error's first line."""
        self.stack.__exit__(type(e), e, e.__traceback__)

    def finish(self, summary: dict[str, Any], register: str | None) -> dict[str, Any]:
        """End the children, log the comparison and the winner, register it; end the parent
        FINISHED. Returns the parent's info, with the registered version."""
        client = self.tracked.client
        _end_children(client, self.tracked.experiment_id, self.run_id, summary["trials"])
        winner = summary.get("winner")
        self.tracked.set_tags(
            {
                "charlm.sweep.trials": len(summary["trials"]),
                "charlm.sweep.stopped_early": sum(
                    1 for t in summary["trials"] if t["ended"].startswith("stopped")
                ),
                **({"charlm.sweep.winner": winner["trial_id"]} if winner else {}),
                **(
                    {"charlm.sweep.winner_run_id": winner["mlflow_run_id"]}
                    if winner and winner["mlflow_run_id"]
                    else {}
                ),
            }
        )
        if winner is not None:
            client.log_metric(
                self.run_id, "best_val_loss", float(winner["best_val_loss"]), step=winner["steps"]
            )
            client.log_metric(
                self.run_id, "best_val_bpc", float(winner["best_val_bpc"]), step=winner["steps"]
            )
        _log_comparison(client, self.run_id, summary)
        info = self.tracked.info()
        if register is not None:
            info["registered"] = _register_winner(self, summary, register)
        self.stack.close()  # FINISHED
        return info


def open_parent(
    record: dict[str, Any] | None,
    name: str,
    folder: str,
    data_ref: refs.DataRef,
    store: str,
    tracking_uri: str | None,
    experiment: str | None,
    space: Space,
    key: dict[str, Any],
) -> Parent:
    """The sweep's parent run: the one recorded in the sweep folder continued when it is in this
    tracking store and not FINISHED, else a new one."""
    from mlflow.exceptions import MlflowException

    from charlm.tracking import (
        DEFAULT_EXPERIMENT,
        EXPERIMENT_ENV,
        TrackingSession,
        describe_dataset,
        start_run,
    )

    s = TrackingSession.open(tracking_uri, store)
    exp = experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    resume_id = None
    attempt = 1
    if record is not None and record.get("parent_run_id") and record.get("tracking_uri") == s.shown:
        with contextlib.suppress(MlflowException):
            run = s.client.get_run(record["parent_run_id"])
            if run.info.status != "FINISHED" and run.info.lifecycle_stage == "active":
                resume_id = run.info.run_id
                attempt = int(run.data.tags.get("charlm.attempt", "1")) + 1
    stack = contextlib.ExitStack()
    params = {
        "sweep.space": json.dumps(space.to_dict(), sort_keys=True),
        "sweep.scheduler": key["scheduler"],
        "sweep.trials": key["trials"],
        "sweep.grace_period": key["grace_period"],
        "sweep.reduction_factor": key["reduction_factor"],
        **{f"base.{k}": v for k, v in key["base"].items()},
    }
    tracked = stack.enter_context(
        start_run(
            session=s,
            store=store,
            experiment=exp,
            run_name=name,
            dataset=describe_dataset(data_ref, store),
            params=params,
            tags={SWEEP_TAG: name, ROLE_TAG: "parent", "charlm.sweep.folder": folder},
            resume_run_id=resume_id,
            attempt=attempt,
        )
    )
    return Parent(tracked, exp, stack)


def _end_children(client: Any, experiment_id: str, parent_id: str, trials: list[dict[str, Any]]) -> None:
    """Every child run ended: FINISHED with how its trial ended (completed or stopped by the
    scheduler at step S) and its rank, FAILED for a failed trial; a child no trial reported
    (its trial never evaluated) KILLED. Nothing stays RUNNING."""
    by_id = {t["mlflow_run_id"]: t for t in trials if t.get("mlflow_run_id")}
    children = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
    for child in children:
        rid = child.info.run_id
        t = by_id.get(rid)
        if t is None:
            trial_id = child.data.tags.get("charlm.sweep.trial_id")
            t = next((x for x in trials if x["trial_id"] == trial_id), None)
        tags = {ENDED_TAG: t["ended"] if t else "lost: its trial is not in the sweep's results"}
        if t is not None and t["rank"] is not None:
            tags[RANK_TAG] = str(t["rank"])
        for k, v in tags.items():
            client.set_tag(rid, k, v)
        failed = t is None or t["ended"].startswith("failed")
        if not failed and ERROR_TAG in child.data.tags:  # a trial the scheduler stopped mid-call
            client.delete_tag(rid, ERROR_TAG)
        status = "FAILED" if t is not None and failed else ("KILLED" if t is None else "FINISHED")
        if child.info.status != status:
            client.set_terminated(rid, status=status)


def _log_comparison(client: Any, run_id: str, summary: dict[str, Any]) -> None:
    """comparison.png, trials.md and trials.json under the parent's sweep/ artifacts."""
    with tempfile.TemporaryDirectory(prefix="charlm-sweep-") as d:
        trials = summary["trials"]
        png = report.comparison_png(trials, os.path.join(d, "comparison.png"), summary["sweep"])
        if png is not None:
            client.log_artifact(run_id, png, "sweep")
        md = os.path.join(d, "trials.md")
        with open(md, "w") as f:
            f.write(report.table_markdown(trials))
        client.log_artifact(run_id, md, "sweep")
        js = os.path.join(d, "trials.json")
        with open(js, "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "mlflow"}, f, indent=1, default=str)
        client.log_artifact(run_id, js, "sweep")


def _register_winner(parent: Parent, summary: dict[str, Any], name: str) -> dict[str, Any] | None:
    from charlm.tracking import register_checkpoint

    winner = summary.get("winner")
    if winner is None or not winner.get("best_checkpoint") or not winner.get("mlflow_run_id"):
        print(
            f"charlm: sweep {summary['sweep']}: no trial evaluated; nothing registered as {name}",
            file=sys.stderr,
        )
        return None
    return register_checkpoint(
        winner["best_checkpoint"],
        name,
        run_id=winner["mlflow_run_id"],
        tracking_uri=parent.uri,
        dataset_id=summary.get("dataset_id"),
        tags={
            SWEEP_TAG: summary["sweep"],
            "charlm.sweep.parent_run_id": parent.run_id,
            RANK_TAG: 1,
            "charlm.sweep.trial_id": winner["trial_id"],
        },
    )
