"""MLflow continuity across a killed driver and a rerun (issue 17, item 6).

A training driver killed mid-run and rerun with the same command resumes from its checkpoint; its
MLflow run must go on too: the same run id (recorded in the run folder's mlflow-run.json), metrics
going on from their last step, params never re-logged with another value, the attempt as a tag.
Where the recorded run cannot be continued (deleted, FINISHED, in another tracking store) a new
run takes over, linked both ways, and the lost one is not left RUNNING.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from charlm import runs
from charlm import tracking as trk
from charlm.train import Callback

pytest_plugins = ["mlflow_fixtures"]
pytest.register_assert_rewrite("mlflow_fixtures")
from mlflow_fixtures import corpus_text, tiny_config, unique  # noqa: E402

OPTS = {"sample_length": 20, "temperatures": (1.0,)}  # a short sample sweep at the end


# -- helpers ----------------------------------------------------------------------------------------
def _client(uri: str) -> MlflowClient:
    return trk._activate(uri)


def _runs(uri: str, exp_name: str) -> list[Any]:
    client = _client(uri)
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL) if exp else []


def _assert_steps_go_on(client: MlflowClient, run_id: str, final_step: int, log_every: int) -> None:
    """Every metric's steps, in the order they were logged, strictly increasing (no step logged
    twice, none reset); the training metrics reach the final step, with no log step missing."""
    run = client.get_run(run_id)
    assert {"train_loss", "val_loss", "lr"} <= set(run.data.metrics)
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        steps = [m.step for m in sorted(history, key=lambda m: m.timestamp)]
        assert all(a < b for a, b in itertools.pairwise(steps)), f"{key}: steps {steps}"
        assert len(set(steps)) == len(history), f"{key}: a step logged twice: {sorted(steps)}"
    for key in ("train_loss", "val_loss"):
        assert max(m.step for m in client.get_metric_history(run_id, key)) == final_step
    train_steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
    assert train_steps == list(range(log_every, final_step + 1, log_every))


def _no_running(uri: str, exp_name: str) -> None:
    left = [(r.info.run_id, r.info.status) for r in _runs(uri, exp_name) if r.info.status == "RUNNING"]
    assert left == [], f"runs left RUNNING: {left}"


_ABANDONED: list[contextlib.ExitStack] = []


def _killed_driver(uri: str, folder: str, exp_name: str) -> str:
    """What a driver killed mid-run leaves: the folder's MLflow run opened and recorded there,
    never ended (the context is entered and abandoned, as SIGKILL abandons it)."""
    from charlm.tracking.runs import _open_for_folder

    s = trk.TrackingSession.open(uri)
    stack = contextlib.ExitStack()  # never closed, and kept: a collected one would end the run FAILED
    _ABANDONED.append(stack)

    def start(**kw: Any) -> trk.TrackedRun:
        return stack.enter_context(trk.start_run(session=s, experiment=exp_name, **kw))

    run_id = _open_for_folder(s, folder, start).run_id
    assert _client(uri).get_run(run_id).info.status == "RUNNING"
    return run_id


def _rerun_without_training(uri: str, folder: str, exp_name: str, corpus: Path) -> dict[str, Any]:
    return trk.tracked_training(
        lambda tr: {"steps": 0, "out_dir": folder},
        corpus=str(corpus),
        out=folder,
        tracking_uri=uri,
        experiment=exp_name,
    )


# -- where the recorded run cannot be continued -------------------------------------------------------
def test_a_deleted_run_is_replaced_by_a_new_one_and_marked_killed_with_links(sqlite_tracking, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text(0, 2000))
    folder, exp = str(tmp_path / "run"), unique("deleted")
    old = _killed_driver(sqlite_tracking, folder, exp)
    assert runs.read_json(folder, runs.MLFLOW_FILE)["run_id"] == old
    _client(sqlite_tracking).delete_run(old)

    new = _rerun_without_training(sqlite_tracking, folder, exp, corpus)["mlflow"]["run_id"]
    client = _client(sqlite_tracking)
    assert new != old
    r_new, r_old = client.get_run(new), client.get_run(old)
    assert r_new.info.status == "FINISHED"
    assert r_new.data.tags["charlm.resumes"] == old and r_new.data.tags["charlm.resumes_reason"] == "deleted"
    assert r_new.data.tags["charlm.attempt"] == "2" and "charlm.attempt.2.started" in r_new.data.tags
    assert r_old.info.status == "KILLED" and r_old.data.tags["charlm.resumed_by"] == new
    assert r_old.info.lifecycle_stage == "deleted"  # still where the user put it
    record = runs.read_json(folder, runs.MLFLOW_FILE)
    assert record["run_id"] == new and record["attempt"] == 2
    _no_running(sqlite_tracking, exp)


def test_a_recorded_run_that_no_longer_exists_is_replaced(sqlite_tracking, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text(0, 2000))
    folder, exp = str(tmp_path / "run"), unique("gone")
    shown = trk.TrackingSession.open(sqlite_tracking).shown
    runs.write_json(folder, runs.MLFLOW_FILE, {"run_id": "0" * 32, "tracking_uri": shown, "attempt": 3})

    new = _rerun_without_training(sqlite_tracking, folder, exp, corpus)["mlflow"]["run_id"]
    tags = _client(sqlite_tracking).get_run(new).data.tags
    assert tags["charlm.resumes"] == "0" * 32 and tags["charlm.resumes_reason"] == "not found"
    assert tags["charlm.attempt"] == "4" and runs.read_json(folder, runs.MLFLOW_FILE)["run_id"] == new
    _no_running(sqlite_tracking, exp)


def test_a_run_in_another_tracking_store_is_killed_there_and_linked(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text(0, 2000))
    before, after = f"sqlite:///{tmp_path}/before.db", f"sqlite:///{tmp_path}/after.db"
    folder, exp = str(tmp_path / "run"), unique("moved")
    old = _killed_driver(before, folder, exp)

    new = _rerun_without_training(after, folder, exp, corpus)["mlflow"]["run_id"]
    r_new = _client(after).get_run(new)
    assert r_new.info.status == "FINISHED" and r_new.data.tags["charlm.resumes"] == f"{old} in {before}"
    r_old = _client(before).get_run(old)
    assert r_old.info.status == "KILLED" and r_old.data.tags["charlm.resumed_by"] == f"{new} in {after}"
    _no_running(before, exp)
    _no_running(after, exp)


def test_an_already_finished_ray_run_opens_no_new_mlflow_run(sqlite_tracking, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text(0, 2000))
    folder, exp = str(tmp_path / "run"), unique("done")

    def ray_like(summary: dict[str, Any]):
        def run_fn(tr: trk.TrainingTracker) -> dict[str, Any]:
            if not summary.get("already_finished"):
                tr.bind_folder(folder)  # what train_distributed's on_run_folder hook does
            return summary

        return trk.tracked_training(run_fn, corpus=str(corpus), tracking_uri=sqlite_tracking, experiment=exp)

    first = ray_like({"steps": 5, "run_url": folder})
    again = ray_like({"steps": 5, "run_url": folder, "already_finished": True})
    assert again["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    assert [r.info.status for r in _runs(sqlite_tracking, exp)] == ["FINISHED"]


# -- continuing: metrics go on from their step -----------------------------------------------------------
class _FailAt(Callback):
    """Keeps a copy of last.pt at step `keep`, then fails at the evaluation of step `fail` (after
    the tracking callback flushed it): a rerun resumes from a checkpoint older than the metrics."""

    def __init__(self, out: Path, keep: int, fail: int) -> None:
        self.out, self.keep, self.fail = out, keep, fail

    def on_eval(self, run, metrics) -> None:
        if run.step == self.keep:
            shutil.copy(self.out / runs.LAST_FILE, self.out / "kept.pt")
        if run.step == self.fail:
            raise RuntimeError(f"disk full at step {run.step}")


def test_a_failed_run_ends_failed_and_its_rerun_continues_it_without_repeating_steps(
    sqlite_tracking, tiny_datasets, tmp_path
):
    from charlm.cli import run_local_training

    store, dataset, out = tiny_datasets["store"], tiny_datasets["main"], tmp_path / "out"
    exp = unique("continue")

    def run(cfg, extra, resume):
        return trk.tracked_training(
            lambda tr: run_local_training(
                cfg,
                dataset,
                out,
                resume=resume,
                quiet=True,
                store=store,
                device="cpu",
                extra_callbacks=[*tr.callbacks(), *extra],
            ),
            corpus=dataset,
            out=out,
            store=store,
            tracking_uri=sqlite_tracking,
            experiment=exp,
            params={"workers": 1},
            callback_options=OPTS,
        )

    with pytest.raises(RuntimeError, match="disk full at step 40"):
        run(tiny_config(max_steps=60, eval_every=20), [_FailAt(out, 20, 40)], False)
    client = _client(sqlite_tracking)
    (failed,) = _runs(sqlite_tracking, exp)
    assert failed.info.status == "FAILED" and "disk full" in failed.data.tags["charlm.error"]
    assert max(m.step for m in client.get_metric_history(failed.info.run_id, "train_loss")) == 40
    os.replace(out / "kept.pt", out / runs.LAST_FILE)  # resume from step 20: steps 21-40 run again

    # the rerun asks for more steps: max_steps keeps its first value (MLflow refuses a change)
    summary = run(tiny_config(max_steps=80, eval_every=20), [], True)
    assert summary["mlflow"]["run_id"] == failed.info.run_id and summary["steps"] == 80
    (r,) = _runs(sqlite_tracking, exp)
    assert r.info.status == "FINISHED" and "charlm.error" not in r.data.tags
    assert "disk full at step 40" in r.data.tags["charlm.attempt.1.error"]
    assert r.data.tags["charlm.attempt"] == "2" and {
        "charlm.attempt.1.started",
        "charlm.attempt.2.started",
    } <= set(r.data.tags)
    assert r.data.tags["resumed_at_step"] == "20"
    assert r.data.params["max_steps"] == "60" and r.data.tags["resumed_param_changes"] == "max_steps"
    _assert_steps_go_on(client, r.info.run_id, 80, log_every=5)


# -- the real thing: a driver process SIGKILLed and the same command run again --------------------------------
TINY_FLAGS = [
    "--num-layers", "1", "--hidden-size", "96", "--embed-size", "16", "--seq-len", "32",
    "--batch-size", "8", "--eval-every", "20", "--seed", "3", "--val-frac", "0.1",
    "--test-frac", "0.1", "--precision", "fp32",
]  # fmt: skip


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    """SIGKILL the process group of proc once ready() holds; fail if proc ends first."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, (
                f"the driver ended before {what}: {proc.stderr.read().decode()[-2000:]}"
            )
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the driver was not killed mid-run (exit {proc.returncode})"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_USAGE_STATS_ENABLED="0", MLFLOW_ENABLE_TELEMETRY="false", DO_NOT_TRACK="1", **extra)
    return env


def _check_one_continued_run(uri: str, exp: str, killed_id: str, final_step: int) -> None:
    (r,) = _runs(uri, exp)  # exactly one run for this config
    assert r.info.run_id == killed_id and r.info.status == "FINISHED"
    assert r.data.tags["charlm.attempt"] == "2" and "charlm.attempt.2.started" in r.data.tags
    _assert_steps_go_on(_client(uri), r.info.run_id, final_step, log_every=10)  # the CLI's default
    _no_running(uri, exp)


def test_a_killed_local_driver_rerun_continues_the_same_mlflow_run(sqlite_tracking, tmp_path):
    corpus, out, exp = tmp_path / "corpus.txt", tmp_path / "out", unique("killed-local")
    model = unique("resumed")
    corpus.write_text(corpus_text(2, 30_000))
    cmd = [
        sys.executable, "-m", "charlm.cli", "train", str(corpus), "--out", str(out), "--resume",
        "--max-steps", "200", "--device", "cpu", *TINY_FLAGS, "--register", model,
        "--tracking-uri", sqlite_tracking, "--experiment", exp, "--json",
    ]  # fmt: skip
    env = _env(CHARLM_STORE=str(tmp_path / "store"))
    first = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _kill_when(first, lambda: (out / runs.LAST_FILE).is_file(), "first checkpoint")
    (killed,) = _runs(sqlite_tracking, exp)
    assert killed.info.status == "RUNNING"  # what a kill leaves

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_one_continued_run(sqlite_tracking, exp, killed.info.run_id, 200)
    versions = _client(sqlite_tracking).search_model_versions(f"name = '{model}'")
    assert [v.run_id for v in versions] == [killed.info.run_id]  # registered once, at the end
    assert runs.read_json(str(out), runs.MLFLOW_FILE)["run_id"] == killed.info.run_id


@pytest.mark.slow
def test_a_killed_ray_driver_rerun_continues_the_same_mlflow_run(sqlite_tracking, tmp_path):
    corpus, store, exp = tmp_path / "corpus.txt", tmp_path / "store", unique("killed-ray")
    corpus.write_text(corpus_text(3, 30_000))
    cmd = [
        sys.executable, "-m", "charlm.cli", "train", str(corpus), "--workers", "2", "--store", str(store),
        "--max-steps", "200", *TINY_FLAGS, "--tracking-uri", sqlite_tracking, "--experiment", exp, "--json",
    ]  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="cmr-")
    env = _env(
        RAY_TMPDIR=ray_tmp,
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
        RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION="0",
        RAY_TRAIN_METRICS_ENABLED="0",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
    )
    try:
        first = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

        def checkpointed() -> bool:  # Ray has committed a checkpoint in the run folder
            return any(runs._snapshot_entries(str(f)) for f in store.glob("runs/*") if f.is_dir())

        _kill_when(first, checkpointed, "committed checkpoint", timeout=300)
        (killed,) = _runs(sqlite_tracking, exp)
        assert killed.info.status == "RUNNING"  # what a kill leaves

        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=600, start_new_session=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    _check_one_continued_run(sqlite_tracking, exp, killed.info.run_id, 200)
    (folder,) = [f for f in store.glob("runs/*") if f.is_dir()]
    assert runs.read_json(str(folder), runs.MLFLOW_FILE)["run_id"] == killed.info.run_id
