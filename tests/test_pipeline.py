"""The end-to-end pipeline, scheduled retraining, prefect.yaml deployments and the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import netwatch
import pytest
from mlflow_fixtures import _free_port, corpus_text, tiny_config, unique

pytest_plugins = ["mlflow_fixtures"]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One local Ray for the module, started in the main thread after the S3 env is set."""
    ray = pytest.importorskip("ray")
    from charlm import distributed

    tmp = tempfile.mkdtemp(prefix="crp-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.delenv("RAY_ADDRESS", raising=False)
        distributed.ensure_ray(num_cpus=2)
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_pipeline_end_to_end_retrain_and_skip(
    ray_local, s3_bucket, mlflow_server, prefect_harness, put_objects, monkeypatch
):
    from charlm import distributed, tracking
    from charlm.genjob import read_records
    from flows.pipeline import pipeline
    from flows.retrain import retrain

    store = f"{s3_bucket}/store"
    corpus = f"{s3_bucket}/corpora/words/"
    text = corpus_text(1, 12_000)
    put_objects(corpus, {"a.txt": text.encode(), "b.txt": corpus_text(2, 12_000).encode()})
    prompts = put_objects(f"{s3_bucket}/prompts", {"p.txt": f"{text[:5]}\n{text[20:23]}\n€uro\n".encode()})[0]
    name = unique("pipe")
    cfg = tiny_config(max_steps=30, eval_every=10).to_dict()
    kw = dict(
        config=cfg,
        scaling={"workers": 2},
        store=store,
        prompts=prompts,
        tracking_uri=mlflow_server.uri,
        generate_config={"num_samples": 2, "length": 20, "seed": 5},
    )

    first = pipeline([corpus], name, **kw)
    assert first["trained"]["version"] == 1 and not first["trained"]["skipped"]
    assert first["decision"]["promoted"] and first["decision"]["decision"] == "promoted"
    records = read_records(first["samples"]["out"])
    assert len(records) == 3 * 2 and sum(1 for r in records if r["error"]) == 2  # '€' is not in the vocab
    assert all(
        r["model"].startswith(f"models:/{name}/1") and r["seed"] == 5 and r["params"]["length"] == 20
        for r in records
    )
    assert all(len(r["sample"]) == 20 for r in records if not r["error"])

    # unchanged corpus: same dataset, nothing trained or registered, same samples job
    second = pipeline([corpus], name, **kw)
    assert second["dataset"]["id"] == first["dataset"]["id"] and second["dataset"]["reused"]
    assert second["trained"] == {"version": 1, "skipped": True}
    assert second["samples"]["out"] == first["samples"]["out"] and second["samples"].get("reused")
    assert len(tracking.list_versions(name, tracking_uri=mlflow_server.uri)["versions"]) == 1

    # the scheduled retrain on an unchanged prefix returns without touching Ray
    def no_ray(*a, **k):
        raise AssertionError("retrain started Ray although nothing changed")

    with monkeypatch.context() as mp:
        mp.setattr(distributed, "ensure_ray", no_ray)
        mp.setattr(distributed, "train_distributed", no_ray)
        quiet = retrain(
            corpus, name, config=cfg, scaling={"workers": 2}, store=store, tracking_uri=mlflow_server.uri
        )
    assert quiet["ran"] is False and quiet["dataset"] == first["dataset"]["id"]

    # a new object: new dataset version, new model version, promoted only if better by the margin
    put_objects(corpus, {"c.txt": corpus_text(3, 12_000).encode()})
    again = retrain(
        corpus,
        name,
        config=cfg,
        scaling={"workers": 2},
        store=store,
        prompts=prompts,
        tracking_uri=mlflow_server.uri,
    )
    assert again["ran"] and again["added"] == [f"{corpus}c.txt"]
    res = again["pipeline"]
    assert res["dataset"]["id"] != first["dataset"]["id"] and res["trained"]["version"] == 2
    d = res["decision"]
    better = d["candidate_bpc"] < d["champion_bpc"] - 0.01
    assert d["promoted"] is better
    champion = tracking.alias_version(name, "champion", tracking_uri=mlflow_server.uri)
    assert int(champion) == (2 if better else 1)


@pytest.mark.slow
def test_prefect_yaml_deploys_against_a_local_server(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "CHARLM_PROJECT_DIR": str(ROOT),
    }
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        import urllib.request

        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180
            )

        assert run("work-pool", "create", "charlm", "--type", "process").returncode == 0
        dep = run("--no-prompt", "deploy", "--all")
        assert dep.returncode == 0, dep.stdout[-2000:] + dep.stderr[-2000:]
        listed = run("deployment", "ls").stdout
        for d in (
            "ingest-corpus/ingest",
            "train-model/train",
            "pipeline/pipeline",
            "retrain/retrain-shakespeare",
            "generate/generate",
        ):
            assert d in listed
        inspect = run("deployment", "inspect", "retrain/retrain-shakespeare").stdout
        assert "0 * * * *" in inspect and str(ROOT) in inspect
    finally:
        os.killpg(server.pid, 15)
        server.wait(20)


def _run_then_stop_prefect(argv: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    """Run a command, then stop the local Prefect server it started in env's PREFECT_HOME."""
    try:
        return subprocess.run(argv, env=env, **kw)
    finally:
        subprocess.run([str(BIN / "charlm"), "server", "stop"], env=env, capture_output=True, timeout=60)


@pytest.mark.slow
def test_demo_runs_on_the_embedded_default(tmp_path):
    env = {
        **os.environ,
        "CHARLM_STORE": str(tmp_path / "store"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="crd-"),
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    with netwatch.Watcher() as listening:
        res = _run_then_stop_prefect(
            [
                str(BIN / "charlm"),
                "demo",
                "--minutes",
                "0.05",
                "--hidden-size",
                "32",
                "--length",
                "40",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert res.returncode == 0, res.stderr[-3000:]
    if netwatch.available():  # Ray, its workers, the ephemeral Prefect server: loopback only
        assert len(listening.loopback_seen) >= 5, listening.loopback_seen
        assert listening.exposed() == []
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["trained"]["version"] == 1 and out["decision"]["promoted"]
    assert [r["prompt"] for r in out["sample_records"]] == ["def ", "class ", "import "]
    assert all(len(r["sample"]) == 40 for r in out["sample_records"])
    assert out["tracking_uri"].startswith("sqlite:///") and str(tmp_path) in out["tracking_uri"]
    assert not (Path.cwd() / "mlflow.db").exists() and not (Path.cwd() / "mlruns").exists()
