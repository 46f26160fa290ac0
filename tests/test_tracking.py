"""Tracked training runs (charlm.tracking) against sqlite tracking and a real mlflow server whose
artifacts live in the test S3 server: params, metrics, artifacts, lineage tags, FAILED runs,
secrets, the callback in another process, where MLflow lives by default."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from charlm import tracking as trk
from charlm.config import TrainConfig

pytest_plugins = ["mlflow_fixtures"]
pytest.register_assert_rewrite("mlflow_fixtures")
from mlflow_fixtures import SECRET_URL, SENTINEL, artifact_files, tiny_config, unique  # noqa: E402


def _train(cfg: TrainConfig, dataset: str, out: Path, tracked: trk.TrackedRun, store: str) -> dict:
    from charlm.cli import run_local_training

    return run_local_training(
        cfg,
        dataset,
        out,
        resume=False,
        quiet=True,
        store=store,
        device="cpu",
        extra_callbacks=tracked.callbacks(),
    )


# -- where MLflow lives ---------------------------------------------------------------------------------
def test_tracking_uri_is_pinned_beside_the_store_never_the_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    assert trk.resolve_tracking_uri(store=str(store)) == f"sqlite:///{store}/mlflow.db"
    assert trk.artifact_root(str(store)) == (store / "mlflow-artifacts").as_uri()
    remote = trk.resolve_tracking_uri(store="s3://bucket/team")
    assert remote.startswith(f"sqlite:///{tmp_path}/home/.charlm/mlflow/") and remote.endswith(".db")
    assert remote != trk.resolve_tracking_uri(store="s3://bucket/other")  # one database per store
    assert trk.artifact_root("s3://bucket/team/") == "s3://bucket/team/mlflow-artifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert trk.resolve_tracking_uri(store=str(store)) == "http://127.0.0.1:1"
    assert trk.resolve_tracking_uri("sqlite:////x/y.db", str(store)) == "sqlite:////x/y.db"
    assert not list(tmp_path.glob("mlruns")) and not list(tmp_path.glob("mlflow.db"))


def test_default_tracking_creates_db_and_artifacts_in_the_store(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    with trk.start_run(store=str(store), experiment="where") as run:
        run.set_tags({"x": "1"})
        trk._log_text(run.client, run.run_id, "hello", "note.txt")
    assert (store / "mlflow.db").is_file()
    assert list((store / "mlflow-artifacts").rglob("note.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # nothing in the working directory
    # MLflow exports the last URI/experiment it was given; charlm takes them back out
    assert not {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"} & set(os.environ)
    assert trk.resolve_tracking_uri(store=str(tmp_path / "other")) == f"sqlite:///{tmp_path}/other/mlflow.db"


# -- secrets ----------------------------------------------------------------------------------------------------
def test_redact_removes_url_passwords_signed_queries_and_secret_env_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "hunter2-is-long")
    monkeypatch.setenv("HARMLESS_NAME", "visible-value")
    text = (
        "https://bob:pa55word@example.com/x.txt s3://key:secret@bucket/k "
        "https://h/x?X-Amz-Signature=abcdef&part=1 https://h/y?access_token=zzz "
        "postgresql://mlflow:dbpass@db:5432/mlflow and hunter2-is-long and visible-value"
    )
    out = trk.redact(text)
    for secret in ("pa55word", "secret@", "abcdef", "zzz", "dbpass", "hunter2-is-long", "bob"):
        assert secret not in out, secret
    assert "visible-value" in out and "part=1" in out and "example.com/x.txt" in out
    assert trk.redact_obj({"a": [SECRET_URL], "b": {"c": SENTINEL}}) == {
        "a": ["https://***@corpora.example.invalid/tiny.txt"],
        "b": {"c": "***"},
    }


# -- the tracked run --------------------------------------------------------------------------------------------
def test_tracked_training_logs_params_metrics_artifacts_and_no_secret(tracking, tiny_datasets, tmp_path):
    store, dataset = tiny_datasets["store"], tiny_datasets["main"]
    cfg = tiny_config()
    summary = trk.tracked_training(
        lambda tr: _train(cfg, dataset, tmp_path / "out", tr, store),
        corpus=dataset,
        out=tmp_path / "out",
        store=store,
        tracking_uri=tracking.uri,
        experiment=unique("exp"),
        params={"note": f"mirror {SECRET_URL}"},
        callback_options={"sample_length": 60},
    )
    client = trk._activate(tracking.uri)
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    for k, v in cfg.to_dict().items():
        assert p[k] == str(v), k
    assert p["dataset_id"] == dataset
    assert p["world_size"] == "1" and p["effective_precision"] == "fp32" and p["effective_batch_size"] == "8"
    assert p["charlm_version"] and p["torch_version"] and int(p["vocab_size"]) > 20

    t = run.data.tags
    assert t["dataset_id"] == dataset and t["dataset_fingerprint"] == dataset
    assert "corpora.example.invalid/tiny.txt" in t["source_urls"]
    if trk.git_commit():  # (others may commit meanwhile: check the shape, not the value)
        assert (
            re.fullmatch(r"[0-9a-f]{40}", t["git_commit"])
            and t["git_commit"] == t["mlflow.source.git.commit"]
        )

    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val] == [20, 40, 60]
    assert abs(min(m.value for m in val) - summary["best_val_loss"]) < 1e-9
    for key in ("train_loss", "train_bpc", "val_bpc", "lr", "chars_per_s"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(5, 61, 5))

    files = artifact_files(client, run.info.run_id)
    for f in (
        "vocab.json",
        "dataset/manifest.json",
        "loss.png",
        "samples.md",
        "samples.html",
        "metrics.json",
    ):
        assert f in files, f
    folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    md = (folder / "samples.md").read_text()
    for temp in ("| 0.2 |", "| 0.5 |", "| 0.8 |", "| 1 |", "| 1.2 |"):
        assert temp in md
    assert json.loads((folder / "dataset/manifest.json").read_text())["id"] == dataset
    assert (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"

    # the sentinel (an env secret, and the password of a source URL) is nowhere
    assert SENTINEL not in json.dumps({"params": p, "tags": t})
    for f in folder.rglob("*"):
        if f.is_file():
            assert SENTINEL.encode() not in f.read_bytes(), f
    assert "reader" not in t["source_urls"]
    if tracking.kind == "server":  # artifacts went through the server into the S3 bucket
        import boto3

        keys = [
            o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=tracking.server.bucket)["Contents"]
        ]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/loss.png") for k in keys)


class _Boom(Exception):
    pass


class _FailAtSecondEval(trk.Callback):
    def __init__(self) -> None:
        self.evals = 0

    def on_eval(self, run, metrics):
        self.evals += 1
        if self.evals == 2:
            raise _Boom("disk full while writing checkpoint")


def test_failed_training_ends_failed_and_registers_nothing(tracking, tiny_datasets, tmp_path):
    store, dataset = tiny_datasets["store"], tiny_datasets["main"]
    name = unique("failing")
    seen = {}

    def run_fn(tr):
        from charlm.cli import run_local_training

        seen["run_id"] = tr.run_id
        return run_local_training(
            tiny_config(),
            dataset,
            tmp_path / "out",
            resume=False,
            quiet=True,
            store=store,
            device="cpu",
            extra_callbacks=[*tr.callbacks(), _FailAtSecondEval()],
        )

    with pytest.raises(_Boom):
        trk.tracked_training(
            run_fn,
            corpus=dataset,
            out=tmp_path / "out",
            store=store,
            register=name,
            tracking_uri=tracking.uri,
            experiment=unique("exp"),
        )
    client = trk._activate(tracking.uri)
    run = client.get_run(seen["run_id"])
    assert run.info.status == "FAILED"
    assert "disk full" in run.data.tags["charlm.error"]
    assert client.get_metric_history(run.info.run_id, "val_loss")  # it did log until it failed
    assert client.search_registered_models(f"name = '{name}'") == []
    assert not any(f.startswith("model") for f in artifact_files(client, run.info.run_id))


def test_extending_a_finished_run_opens_a_new_run_linked_to_it(sqlite_tracking, tiny_datasets, tmp_path):
    store, dataset, out = tiny_datasets["store"], tiny_datasets["main"], tmp_path / "out"
    opts = {"sample_length": 20, "temperatures": (1.0,)}

    def run(cfg, resume):
        from charlm.cli import run_local_training

        return trk.tracked_training(
            lambda tr: run_local_training(
                cfg,
                dataset,
                out,
                resume=resume,
                quiet=True,
                store=store,
                device="cpu",
                extra_callbacks=tr.callbacks(),
            ),
            corpus=dataset,
            out=out,
            store=store,
            tracking_uri=sqlite_tracking,
            experiment="resume",
            callback_options=opts,
        )

    first = run(tiny_config(max_steps=20, eval_every=10), False)
    second = run(tiny_config(max_steps=40, eval_every=10), True)
    old, new = first["mlflow"]["run_id"], second["mlflow"]["run_id"]
    assert new != old  # a FINISHED run is not reopened (test_mlflow_resume: a killed one is)
    client = trk._activate(sqlite_tracking)
    r_old, r_new = client.get_run(old), client.get_run(new)
    assert r_old.info.status == "FINISHED" and r_old.data.tags["charlm.resumed_by"] == new
    assert r_new.info.status == "FINISHED" and r_new.data.tags["charlm.resumes"] == old
    assert r_new.data.tags["resumed_at_step"] == "20" and r_new.data.params["max_steps"] == "40"
    assert r_new.data.tags["charlm.attempt"] == "2"
    assert [m.step for m in client.get_metric_history(new, "val_loss")] == [30, 40]


def test_interrupted_run_is_killed_and_errors_in_the_block_propagate(sqlite_tracking):
    with pytest.raises(KeyboardInterrupt), trk.start_run(tracking_uri=sqlite_tracking, experiment="k") as r:
        raise KeyboardInterrupt
    assert trk._activate(sqlite_tracking).get_run(r.run_id).info.status == "KILLED"
    with pytest.raises(ValueError, match="bad"), trk.start_run(tracking_uri=sqlite_tracking) as r2:
        raise ValueError("bad")
    assert trk._activate(sqlite_tracking).get_run(r2.run_id).info.status == "FAILED"


def test_only_rank_zero_logs(sqlite_tracking):
    from charlm.train import Dist

    with trk.start_run(tracking_uri=sqlite_tracking, experiment="ranks") as r:
        cb = r.callbacks()[0]
        fake = types.SimpleNamespace(dist=Dist(rank=1, world_size=2), step=5, is_best=True)
        cb.on_start(fake)
        cb.on_log(fake, {"step": 5, "train_loss": 1.0})
        cb.on_eval(fake, {"step": 5, "val_loss": 1.0})
        cb.on_end(fake, {})
    run = trk._activate(sqlite_tracking).get_run(r.run_id)
    assert run.data.metrics == {} and run.data.params == {}
    assert artifact_files(trk._activate(sqlite_tracking), r.run_id) == []


_CHILD = r"""
import pickle, sys
from charlm.train import train
from charlm.vocab import Vocab
from charlm.data import split_ids
from mlflow_fixtures import corpus_text, tiny_config
factory = pickle.loads(sys.stdin.buffer.read())
text = corpus_text(5, 6000)
vocab = Vocab.from_text(text)
splits = split_ids(vocab.encode(text), 0.1, 0.1)
cfg = tiny_config(max_steps=20, eval_every=10)
train(cfg, vocab, splits, callbacks=factory(), device="cpu")
"""


@pytest.mark.slow
def test_callback_factory_pickles_and_logs_from_another_process(sqlite_tracking):
    with trk.start_run(
        tracking_uri=sqlite_tracking, experiment="remote", callback_options={"sample_length": 40}
    ) as r:
        blob = pickle.dumps(r.callback_factory())
        assert b"Client" not in blob  # no client/session travels, only plain values
        subprocess.run(
            [sys.executable, "-c", _CHILD],
            input=blob,
            check=True,
            timeout=120,
            cwd=Path(__file__).parent,
            capture_output=True,
        )
    client = trk._activate(sqlite_tracking)
    run = client.get_run(r.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(r.run_id, "val_loss")] == [10, 20]
    assert run.data.params["max_steps"] == "20"
    assert "samples.md" in artifact_files(client, r.run_id)


@pytest.fixture
def down_uri():
    """A loopback URL that refuses connections: its port stays bound (not listening) meanwhile,
    so no other process can take it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_server_is_one_line_and_training_keeps_its_metrics(
    sqlite_tracking, down_uri, monkeypatch, capsys
):
    from charlm.cli import main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = down_uri
    assert main(["models", "list", "tiny", "--tracking-uri", down]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"charlm: error: {down}: MLflow tracking server unreachable", err
    with pytest.raises(trk.TrackingError, match="unreachable"):
        trk.alias_version("tiny", tracking_uri=down)  # never "no champion" when it cannot know

    with trk.start_run(tracking_uri=sqlite_tracking, experiment="outage") as r:
        cb = trk.TrackingCallback(down, r.run_id)
        cb._record("train", {"step": 5, "train_loss": 2.0})
        cb.flush(final=False)  # an outage mid-training: kept, training goes on
        assert len(cb._pending) == 1
        with pytest.raises(
            MlflowException, match=rf"{re.escape(down)}/api/2\.0/mlflow/runs/log-batch failed"
        ):
            cb.flush()  # at the end it must not be lost silently
        cb.tracking_uri, cb._client = sqlite_tracking, None  # the server is back
        cb._record("eval", {"step": 10, "val_loss": 1.5})
        cb.flush(final=False)
        assert cb._pending == []
    client = trk._activate(sqlite_tracking)
    assert [m.step for m in client.get_metric_history(r.run_id, "train_loss")] == [5]
    assert [m.step for m in client.get_metric_history(r.run_id, "val_loss")] == [10]


def test_pyfunc_and_logged_samples_take_the_sampling_defaults():
    from charlm.config import SamplingParams

    d = SamplingParams()
    assert {**d.to_dict(), "stop": "", "num_samples": 1, "precision": "auto"} == trk.PARAM_DEFAULTS
    cb = trk.TrackingCallback("file:///nowhere", "run")
    assert (cb.sample_length, cb.sample_seed) == (d.length, d.seed)
