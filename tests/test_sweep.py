"""charlm sweep (charlm.sweep): the space refused before anything starts, a 4-trial ASHA sweep on
local Ray with nested MLflow runs and the winner registered, and a killed sweep continued."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray_fixtures

from charlm import cli
from charlm.config import TrainConfig
from charlm.sweep import SpaceError, grid_space, load_space, merge, report

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--hidden-size", "32", "--embed-size", "8", "--num-layers", "1", "--seq-len", "16",
    "--batch-size", "4", "--warmup-steps", "0", "--precision", "fp32", "--eval-every", "10",
    "--log-every", "5",
]  # fmt: skip


def base(**kw) -> TrainConfig:
    d = dict(hidden_size=32, embed_size=8, num_layers=1, seq_len=16, batch_size=4, warmup_steps=0,
             precision="fp32", eval_every=10, log_every=5, max_steps=40)  # fmt: skip
    d.update(kw)
    return TrainConfig(**d)


# -- the space: fast, no Ray ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, key, problem",
    [
        (
            "lr: {loguniform: [1.0e-4, 1.0e-2]}\nlearning_rat: {choice: [1, 2]}\n",
            "learning_rat",
            "not a TrainConfig field",
        ),
        ("lr: {loguniform: [0, 1.0e-2]}\n", "lr", "loguniform needs lo > 0"),
        ("dropout: {uniform: [0.4, 0.1]}\n", "dropout", "is empty"),
        ("num_layers: {int: [3, 1]}\n", "num_layers", "is empty"),
        ("num_layers: {uniform: [1, 3]}\n", "num_layers", "use int, not uniform"),
        ("cell: {choice: [lstm, transformer]}\n", "cell", "refused by TrainConfig"),
        ("dropout: {uniform: [0.1, 1.5]}\n", "dropout", "refused by TrainConfig"),
        ("hidden_size: {choice: []}\n", "hidden_size", "non-empty list"),
        ("hidden_size: {range: [1, 2]}\n", "hidden_size", "want one of"),
        ("val_frac: {choice: [0.1, 0.2]}\n", "val_frac", "cannot vary within one sweep"),
    ],
)
def test_a_bad_space_file_is_refused_naming_the_file_and_key(tmp_path, text, key, problem):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    with pytest.raises(SpaceError) as e:
        load_space(f, base())
    msg = str(e.value)
    assert msg.startswith(f"{f}: {key}: ") and problem in msg and "\n" not in msg


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if Ray is started (the module's other tests may have a Ray up already)."""
    import charlm.distributed

    def ensure_ray(*a, **kw):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(charlm.distributed, "ensure_ray", ensure_ray)


def test_the_cli_refuses_a_bad_space_in_one_line_before_anything_starts(tmp_path, capsys, no_ray):
    f = tmp_path / "space.json"
    f.write_text(json.dumps({"lr": {"loguniform": [1e-4, 1e-2]}, "hiden_size": {"choice": [32, 64]}}))
    store = tmp_path / "store"
    rc = cli.main(
        [
            "sweep",
            str(tmp_path / "missing-corpus.txt"),
            "--space",
            str(f),
            "--store",
            str(store),
            "--max-steps",
            "10",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err == [
        f"charlm: error: {f}: hiden_size: not a TrainConfig field (`charlm train --help` lists them)"
    ]
    assert not store.exists()  # nothing started: no store, no MLflow database, no Ray (no_ray)


def test_space_files_and_grids_parse_to_typed_values_and_tune_domains(tmp_path):
    f = tmp_path / "s.yml"
    f.write_text(
        "lr: {loguniform: [1.0e-4, 1.0e-2]}\nnum_layers: {int: [1, 3]}\ncell: {choice: [lstm, gru]}\n"
    )
    space = merge(load_space(f, base()), grid_space(["hidden-size=32,64", "dropout=0,0.1"], base()))
    assert space.to_dict()["hidden_size"] == {"grid": [32, 64]}
    assert space.to_dict()["dropout"] == {"grid": [0.0, 0.1]}
    assert space.grid_size == 4 and space.has_random
    with pytest.raises(SpaceError, match=r"^--grid hidden_size: 'x' is not an int$"):
        grid_space(["hidden_size=32,x"])
    with pytest.raises(SpaceError, match=r": lr: also given by --grid$"):
        merge(load_space(f), grid_space(["lr=0.1,0.2"]))
    pytest.importorskip("ray")
    from ray.tune.search.sample import Float, Integer

    t = space.tune_space()["train"]
    assert isinstance(t["lr"], Float) and t["lr"].lower == 1e-4
    assert isinstance(t["num_layers"], Integer) and (t["num_layers"].lower, t["num_layers"].upper) == (1, 4)
    assert t["hidden_size"] == {"grid_search": [32, 64]}


def test_how_a_trial_ended():
    assert report.ended({"completed": True}, None, [(10, 1.0)]) == "completed"
    assert (
        report.ended({"completed": False}, None, [(10, 1.0), (20, 0.9)])
        == "stopped by the scheduler at step 20"
    )
    assert report.ended({}, RuntimeError("boom\nmore"), [(10, 1.0)]) == "failed: boom"


# -- a real sweep on local Ray --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("sweep-corpus") / "c.txt"
    p.write_text(ray_fixtures.make_corpus(20_000))
    return str(p)


@pytest.fixture(scope="module")
def asha_sweep(corpus, tmp_path_factory):
    """4 trials (lr 3e-3 and 1e-5, twice each) of 40 steps, evaluated every 10, under ASHA."""
    pytest.importorskip("ray")
    from charlm.distributed import ensure_ray
    from charlm.sweep import run_sweep

    folder = tmp_path_factory.mktemp("sweep-asha")
    store, uri = str(folder / "store"), f"sqlite:///{folder}/mlflow.db"
    ensure_ray(num_cpus=2)
    import ray

    try:
        space = grid_space(["lr=3e-3,1e-5"], base())
        kw = dict(trials=2, scheduler="asha", register="swept", store=store, tracking_uri=uri)
        summary = run_sweep(corpus, base(), space, **kw)
        again = run_sweep(corpus, base(), space, **kw)
        yield summary, again, store, uri
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_asha_stops_a_losing_trial_early_and_the_winner_is_a_good_one(asha_sweep):
    summary, _, store, _ = asha_sweep
    trials = summary["trials"]
    assert len(trials) == 4
    stopped = [t for t in trials if t["ended"].startswith("stopped by the scheduler at step")]
    assert stopped and all(t["steps"] < 40 for t in stopped)
    assert all(t["config"]["lr"] == 1e-5 for t in stopped)  # only the losers
    assert summary["winner"]["config"]["lr"] == 3e-3 and summary["winner"]["ended"] == "completed"
    assert [t["rank"] for t in trials] == [1, 2, 3, 4]
    assert [t["best_val_loss"] for t in trials] == sorted(t["best_val_loss"] for t in trials)
    # every trial's checkpoints are in the store under the sweep's name
    assert summary["sweep_url"] == os.path.join(store, "runs", "sweeps", summary["sweep"])
    assert all(t["best_checkpoint"].startswith(summary["sweep_url"] + "/") for t in trials)
    assert all(os.path.isfile(t["best_checkpoint"]) for t in trials)
    assert os.path.isfile(os.path.join(summary["sweep_url"], "summary.json"))


@pytest.mark.slow
def test_children_nest_under_the_parent_and_say_how_they_ended(asha_sweep):
    from mlflow import MlflowClient

    summary, _, _, uri = asha_sweep
    client = MlflowClient(uri, registry_uri=uri)
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["charlm.sweep.role"] == "parent"
    assert json.loads(parent.data.params["sweep.space"]) == {"lr": {"grid": [0.003, 1e-05]}}
    assert parent.data.params["sweep.scheduler"] == "asha"
    assert parent.data.tags["charlm.sweep.winner"] == summary["winner"]["trial_id"]
    arts = {f.path for f in client.list_artifacts(parent.info.run_id, "sweep")}
    assert arts == {"sweep/comparison.png", "sweep/trials.md", "sweep/trials.json"}
    table = client.download_artifacts(parent.info.run_id, "sweep/trials.md")
    rows = [
        line for line in Path(table).read_text().splitlines() if line.startswith("| ") and line[2].isdigit()
    ]
    assert [r.split("|")[2].strip() for r in rows] == [t["trial_id"] for t in summary["trials"]]

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    by_trial = {t["trial_id"]: t for t in summary["trials"]}
    for c in children:
        t = by_trial[c.data.tags["charlm.sweep.trial_id"]]
        assert c.info.status == "FINISHED"  # nothing stays RUNNING, a stopped trial included
        assert c.data.tags["charlm.sweep.ended"] == t["ended"]
        assert c.data.tags["charlm.sweep.rank"] == str(t["rank"])
        assert float(c.data.params["lr"]) == t["config"]["lr"]
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "val_loss")]
        assert steps == [s for s, _ in t["curve"]]  # every evaluation, logged once


@pytest.mark.slow
def test_the_winner_is_registered_with_its_sweep_and_no_alias(asha_sweep, corpus):
    from mlflow import MlflowClient

    summary, again, _, uri = asha_sweep
    reg = summary["mlflow"]["registered"]
    client = MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("swept", str(reg["version"]))
    assert mv.run_id == summary["winner"]["mlflow_run_id"]
    assert mv.tags["charlm.sweep.parent_run_id"] == summary["mlflow"]["run_id"]
    assert mv.tags["charlm.sweep.rank"] == "1"
    assert mv.tags["charlm.sweep"] == summary["sweep"]
    assert abs(float(mv.tags["val_loss"]) - summary["winner"]["best_val_loss"]) < 1e-5
    assert client.get_registered_model("swept").aliases == {}
    # the same command again: the finished sweep is returned, nothing trained or registered again
    assert again["already_finished"] is True and again["sweep"] == summary["sweep"]
    assert len(client.search_model_versions("name = 'swept'")) == 1
    # charlm models compare says which sweep the version came from
    from charlm import ingest
    from charlm.tracking import compare_versions

    store = asha_sweep[2]
    held_out = ingest.ingest(corpus, store)["id"]  # the sweep's corpus, published to score on
    compared = compare_versions(
        "swept", [int(reg["version"])], dataset=held_out, tracking_uri=uri, store=store
    )
    assert compared["results"][0]["sweep"] == summary["sweep"]


@pytest.mark.slow
def test_a_killed_sweep_rerun_keeps_finished_trials_and_resumes_running_ones(corpus, tmp_path):
    """Trial A (20 steps) finishes while trial B (400 steps, slowed) runs; the driver and its Ray are
    SIGKILLed; the same command continues: A is not trained again, B resumes from its checkpoint."""
    store, uri = str(tmp_path / "store"), f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "charlm.cli", "sweep", corpus, "--grid", "max_steps=20,400",
           "--scheduler", "fifo", "--store", store, "--tracking-uri", uri, "--json", *TINY]  # fmt: skip
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "DO_NOT_TRACK": "1",
    }
    sweeps = Path(store, "runs", "sweeps")

    def results(max_steps: int) -> list[dict]:
        for d in sweeps.glob("*/run_trial_*"):
            if f"max_steps={max_steps}" in d.name and (d / "result.json").is_file():
                rows = []
                for line in (d / "result.json").read_text().splitlines():
                    with contextlib.suppress(json.JSONDecodeError):  # a line the kill cut short
                        rows.append(json.loads(line))
                return rows
        return []

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            a, b = results(20), results(400)
            if a and a[-1].get("completed") and len(b) >= 2 and not b[-1].get("completed"):
                break
            time.sleep(0.3)
        else:
            pytest.fail(
                f"the sweep did not reach the kill point: {(tmp_path / 'first.log').read_text()[-2000:]}"
            )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    a_before, b_before = results(20), results(400)
    assert not b_before[-1].get("completed")

    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert results(20) == a_before  # the finished trial was not trained again
    b_after = results(400)
    resumed = [r["step"] for r in b_after[len(b_before) :]]
    # went on from a checkpoint (a restart from zero would report step 10 first), to the end
    assert resumed and resumed[0] > 10 and resumed[-1] == 400
    assert {t["ended"] for t in summary["trials"]} == {"completed"}

    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # parent + 2 children
    for r in runs:
        for key in ("val_loss",) if r.data.tags.get("charlm.sweep.role") == "trial" else ():
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert steps == sorted(set(steps))  # each evaluation logged once across the two drivers


# -- the Prefect flow -----------------------------------------------------------------------------------------
def test_the_flow_refuses_a_bad_space_before_ray_starts(tmp_path, no_ray):
    pytest.importorskip("prefect")
    from flows.sweep import sweep_configs

    with pytest.raises(SpaceError, match=r"^space: lr: loguniform needs lo > 0, got 0.0$"):
        sweep_configs.fn(
            "some-dataset", {"lr": {"loguniform": [0, 1]}}, base().to_dict(), store=str(tmp_path)
        )
    with pytest.raises(ValueError, match=r"^options: unknown key\(s\) \['trails'\]"):
        sweep_configs.fn("some-dataset", {"lr": {"choice": [0.1]}}, base().to_dict(), {"trails": 2})


@pytest.mark.slow
def test_the_flow_runs_a_sweep_and_registers_the_winner(corpus, tmp_path, prefect_harness):
    pytest.importorskip("ray")
    from mlflow import MlflowClient

    from flows.sweep import sweep_configs

    store = str(tmp_path / "store")
    import ray

    try:
        out = sweep_configs(
            corpus,
            {"lr": {"grid": [3e-3, 1e-5]}},
            base(max_steps=20).to_dict(),
            {"scheduler": "fifo"},
            register="flowswept",
            store=store,
        )
    finally:
        ray.shutdown()
    assert [t["config"]["lr"] for t in out["trials"]] == [3e-3, 1e-5]
    assert {t["ended"] for t in out["trials"]} == {"completed"}
    client = MlflowClient(
        db := f"sqlite:///{store}/mlflow.db", registry_uri=db
    )  # the default beside a local store
    mv = client.get_model_version("flowswept", str(out["mlflow"]["registered"]["version"]))
    assert mv.tags["charlm.sweep.parent_run_id"] == out["mlflow"]["run_id"]


@pytest.mark.slow
def test_a_sweep_in_an_s3_store_keeps_its_checkpoints_there(corpus, s3_bucket, tmp_path):
    """Tune's storage through charlm's fsspec adapter (pyarrow's FSSpecHandler): trial checkpoints,
    sweep.json and summary.json in the bucket; the winner registered from its S3 checkpoint."""
    from charlm import storage

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "charlm.cli", "sweep", corpus, "--grid", "lr=3e-3,1e-3", "--scheduler", "fifo",
           "--store", s3_bucket, "--tracking-uri", uri, "--register", "s3swept", "--max-steps", "20", "--json",
           *TINY]  # fmt: skip
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "DO_NOT_TRACK": "1",
    }
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    folder = f"{s3_bucket}/runs/sweeps/{summary['sweep']}"
    assert summary["sweep_url"] == folder
    assert [t["ended"] for t in summary["trials"]] == ["completed", "completed"]
    for t in summary["trials"]:
        assert t["best_checkpoint"].startswith(folder + "/") and storage.exists(t["best_checkpoint"])
    assert storage.exists(f"{folder}/sweep.json") and storage.exists(f"{folder}/summary.json")
    from mlflow import MlflowClient

    mv = MlflowClient(uri, registry_uri=uri).get_model_version("s3swept", "1")
    assert mv.tags["charlm.sweep.parent_run_id"] == summary["mlflow"]["run_id"]
