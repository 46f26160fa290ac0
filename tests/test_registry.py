"""Registered versions (charlm.tracking, charlm models ..., flows/evaluate.py) against sqlite
tracking and a real mlflow server with artifacts in the test S3 server: registration with
lineage, models:/NAME@champion predicting what `charlm sample` prints, compare, promote, the
evaluate-and-promote flow, racing registrations."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from charlm import capability
from charlm import tracking as trk
from charlm.vocab import UnknownCharactersError

pytest_plugins = ["mlflow_fixtures"]
pytest.register_assert_rewrite("mlflow_fixtures")
from mlflow_fixtures import tiny_config, unique  # noqa: E402


def _cli(*argv: str) -> tuple[int, Any]:
    from charlm.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(list(argv))
    out = buf.getvalue()
    return rc, json.loads(out.strip().splitlines()[-1]) if rc == 0 and "--json" in argv else out


def _train_and_register(uri: str, store: str, dataset: str, name: str, out: Path, **cfg: Any) -> dict:
    from charlm.cli import run_local_training

    config = tiny_config(**cfg)
    return trk.tracked_training(
        lambda tr: run_local_training(
            config,
            dataset,
            out,
            resume=False,
            quiet=True,
            store=store,
            device="cpu",
            extra_callbacks=tr.callbacks(),
        ),
        corpus=dataset,
        out=out,
        store=store,
        register=name,
        tracking_uri=uri,
        experiment="registry-tests",
        callback_options={"sample_length": 30, "temperatures": (0.5, 1.0)},
    )


@pytest.fixture(scope="module", params=["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def reg(request, tiny_datasets, tmp_path_factory) -> dict[str, Any]:
    """One model NAME per backend: v1 worse (2 steps), v2 better (80 steps), v3 trained on the
    narrow dataset (a smaller vocabulary)."""
    if request.param == "sqlite":
        uri = request.getfixturevalue("sqlite_tracking")
    else:
        uri = request.getfixturevalue("mlflow_server").uri
    store = tiny_datasets["store"]
    name = unique(f"tiny-{request.param}")
    root = tmp_path_factory.mktemp(f"reg-{request.param}")
    runs = {
        "worse": _train_and_register(
            uri, store, tiny_datasets["main"], name, root / "worse", max_steps=2, eval_every=2
        ),
        "better": _train_and_register(
            uri, store, tiny_datasets["main"], name, root / "better", max_steps=80, eval_every=40
        ),
        "narrow": _train_and_register(
            uri, store, tiny_datasets["narrow"], name, root / "narrow", max_steps=60
        ),
    }
    return {"kind": request.param, "uri": uri, "store": store, "name": name, "runs": runs, **tiny_datasets}


def test_register_creates_versions_with_lineage(reg):
    from charlm.ingest import read_manifest

    worse, better = reg["runs"]["worse"], reg["runs"]["better"]
    assert worse["mlflow"]["registered"]["version"] == 1
    assert better["mlflow"]["registered"]["version"] == 2
    assert reg["runs"]["narrow"]["mlflow"]["registered"]["version"] == 3
    client = trk._activate(reg["uri"])
    mv = client.get_model_version(reg["name"], "2")
    assert mv.tags["dataset_id"] == reg["main"]
    assert abs(float(mv.tags["val_bpc"]) - better["best_val_bpc"]) < 1e-5
    assert mv.run_id == better["mlflow"]["run_id"]
    # version -> run -> dataset manifest -> source objects
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dataset_id"] == reg["main"]
    manifest_path = client.download_artifacts(mv.run_id, "dataset/manifest.json")
    manifest = json.loads(Path(manifest_path).read_text())
    assert manifest["id"] == reg["main"]
    for obj in manifest["sources"]["objects"]:
        assert Path(obj["url"]).is_file()
    assert read_manifest(run.data.tags["dataset_url"])["id"] == reg["main"]

    listed = trk.list_versions(reg["name"], tracking_uri=reg["uri"])
    assert [v["version"] for v in listed["versions"]] == [1, 2, 3]
    assert [v["dataset_id"] for v in listed["versions"]] == [reg["main"], reg["main"], reg["narrow"]]
    assert all(v["val_bpc"] > 0 and v["created"] for v in listed["versions"])


def test_champion_predicts_what_charlm_sample_prints(reg, monkeypatch):
    import mlflow
    import pandas as pd

    name, better = reg["name"], reg["runs"]["better"]
    trk.promote(name, 2, tracking_uri=reg["uri"])
    trk.activate(reg["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    params = {"length": 80, "temperature": 0.7, "seed": 11, "num_samples": 2}
    got = model.predict(["Th", ""], params=params)
    rc, cli = _cli(
        "sample",
        better["best_checkpoint"],
        "--prime",
        "Th",
        "--prime",
        "",
        "--length",
        "80",
        "--temperature",
        "0.7",
        "--seed",
        "11",
        "--num-samples",
        "2",
        "--json",
    )
    assert rc == 0
    assert list(got) == [s["text"] for s in cli["samples"]]
    assert len(set(got)) == 4 and all(len(t) == 80 for t in got)
    frame = model.predict(pd.DataFrame({"prompt": ["Th"]}), params={**params, "num_samples": 1})
    assert list(frame) == [got[0]]
    with pytest.raises(UnknownCharactersError, match=r"outside the vocabulary: 'Ω' \(U\+03A9\)"):
        model.predict(["Ω"], params=params)
    with monkeypatch.context() as m:  # a serving machine without int8 or bf16 kernels
        bare = capability.Capabilities("cpu", ("fp32",), ("fp32",), (), {"int8": "no int8 kernel here"})
        m.setattr(capability, "probe", lambda device="cpu": bare)
        with pytest.raises(capability.PrecisionUnavailable) as e:
            model.predict(["Th"], params={**params, "precision": "int8"})
        assert str(e.value) == (
            "precision int8 cannot sample on cpu: no int8 kernel here; precisions that run here: fp32 (or auto)"
        )

    import torch

    _, _, ck, label = trk.resolve_model_ref(f"models:/{name}@champion", tracking_uri=reg["uri"])
    saved = torch.load(better["best_checkpoint"], weights_only=True)
    assert label == f"models:/{name}/2 (@champion)" and ck["step"] == saved["step"]
    assert all(torch.equal(ck["state_dict"][k], v) for k, v in saved["state_dict"].items())
    assert ck["optimizer"] is None and ck["train_state_dict"] is None  # the registered copy is for inference
    assert saved["train_state_dict"] is not None  # the run's own checkpoint kept the trained weights
    for ref in (f"models:/{name}/2", better["best_checkpoint"], better["out_dir"]):
        assert trk.resolve_model_ref(ref, tracking_uri=reg["uri"])[2]["step"] == saved["step"]
    with pytest.raises(trk.TrackingError, match="no alias @nope"):
        trk.resolve_model_ref(f"models:/{name}@nope", tracking_uri=reg["uri"])
    with pytest.raises(trk.TrackingError, match="not registered"):
        trk.resolve_model_ref("models:/no-such-model/1", tracking_uri=reg["uri"])


def test_model_refs_accept_store_urls_and_runs(reg, s3_bucket):
    from charlm import storage

    better = reg["runs"]["better"]
    data = Path(better["best_checkpoint"]).read_bytes()
    storage.write_bytes_atomic(f"{s3_bucket}/runs/r1/best.pt", data)
    for ref in (f"{s3_bucket}/runs/r1/best.pt", f"{s3_bucket}/runs/r1"):
        _, _, ck, label = trk.resolve_model_ref(ref, tracking_uri=reg["uri"])
        assert ck["step"] == 80 and label == ref
    run_ref = f"runs:/{better['mlflow']['run_id']}/{trk.MODEL_ARTIFACT}"
    assert trk.resolve_model_ref(run_ref, tracking_uri=reg["uri"])[2]["step"] == 80
    with pytest.raises(storage.ObjectNotFoundError, match=r"runs/missing\.pt: .*not found"):
        trk.resolve_model_ref(f"{s3_bucket}/runs/missing.pt", tracking_uri=reg["uri"])


def test_compare_ranks_versions_on_the_same_split(reg):
    name = reg["name"]
    trk.promote(name, 2, tracking_uri=reg["uri"])
    r = trk.compare_versions(name, dataset=reg["main"], tracking_uri=reg["uri"], store=reg["store"])
    by = {x["version"]: x for x in r["results"]}
    assert r["dataset"] == reg["main"] and r["split"] == "test"
    assert r["ranking"][:2] == [2, 1] or r["ranking"].index(2) < r["ranking"].index(1)
    assert by[2]["bpc"] < by[1]["bpc"] - 0.3  # trained 80 steps vs 2
    assert by[1]["chars_scored"] == by[2]["chars_scored"] and by[1]["coverage"] == 1.0
    assert by[3]["coverage"] < 1.0 and by[3]["chars_skipped"] > 0 and not by[3]["same_vocab"]
    assert any(n.startswith("version 3: vocab differs") for n in r["notes"])

    rc, out = _cli(
        "models",
        "compare",
        name,
        "1",
        "@champion",
        "--dataset",
        reg["main"],
        "--tracking-uri",
        reg["uri"],
        "--store",
        reg["store"],
        "--json",
    )
    assert rc == 0 and out["ranking"] == [2, 1]
    rc, text = _cli(
        "models", "compare", name, "--tracking-uri", reg["uri"], "--store", reg["store"]
    )  # champion's dataset
    assert rc == 0 and "vocab differs" in text and reg["main"][:12] in text


@pytest.mark.slow
def test_promote_moves_the_alias_only_when_asked_or_better(reg, prefect_harness):
    from flows.evaluate import evaluate_and_promote

    name, uri = reg["name"], reg["uri"]
    rc, out = _cli("models", "promote", name, "1", "--tracking-uri", uri, "--json")
    assert rc == 0 and out["version"] == 1 and trk.alias_version(name, tracking_uri=uri) == 1
    rc, listed = _cli("models", "list", name, "--tracking-uri", uri, "--json")
    assert [v["aliases"] for v in listed["versions"]] == [["champion"], [], []]

    d = evaluate_and_promote(name, "2", tracking_uri=uri, store=reg["store"])
    assert d["decision"] == "promoted" and d["champion"] == 1 and d["candidate_bpc"] < d["champion_bpc"]
    assert trk.alias_version(name, tracking_uri=uri) == 2
    d2 = evaluate_and_promote(name, "1", tracking_uri=uri, store=reg["store"])
    assert d2["decision"] == "kept" and d2["champion"] == 2 and not d2["promoted"]
    assert trk.alias_version(name, tracking_uri=uri) == 2
    # better, but not by the margin: the alias stays
    trk.promote(name, 1, alias="runner-up", tracking_uri=uri)
    d3 = evaluate_and_promote(
        name, "2", alias="runner-up", margin=100.0, tracking_uri=uri, store=reg["store"]
    )
    assert d3["decision"] == "kept" and d3["candidate_bpc"] < d3["champion_bpc"]
    assert trk.alias_version(name, "runner-up", tracking_uri=uri) == 1
    # no holder yet: the candidate takes the alias without a comparison
    d4 = evaluate_and_promote(name, "3", alias="first", tracking_uri=uri, store=reg["store"])
    assert d4["decision"] == "promoted" and d4["reason"].startswith("no version holds")
    # ... but it is scored all the same, and the one-line account shows the figure
    from flows.evaluate import describe

    assert d4["candidate_bpc"] > 0 and d4["champion_bpc"] is None
    assert describe(d4).startswith(f"candidate v3 {d4['candidate_bpc']:.4f} bpc vs no @first yet -> promoted")

    client = trk._activate(uri)
    ev = client.get_run(d["evaluation_run_id"])
    assert ev.data.tags["decision"] == "promoted"
    assert ev.data.metrics["candidate_bpc"] == pytest.approx(d["candidate_bpc"])
    assert ev.data.metrics["champion_bpc"] == pytest.approx(d["champion_bpc"])
    assert client.get_model_version(name, "1").tags["evaluation.champion.decision"] == "kept"

    rc, _ = _cli("models", "promote", name, "99", "--tracking-uri", uri)
    assert rc == 1 and trk.alias_version(name, tracking_uri=uri) == 2


def test_decide_needs_the_margin():
    from flows.evaluate import decide

    assert decide(1.50, 1.60, 0.05)[0] is True
    assert decide(1.58, 1.60, 0.05)[0] is False
    assert decide(1.70, 1.60, 0.0)[0] is False
    assert decide(None, 1.60, 0.0)[0] is False


_REGISTER = r"""
import os, sys, time
from charlm import tracking
uri, ckpt, name, run_id, go = sys.argv[1:6]
tracking.activate(uri)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
print(tracking.register_checkpoint(ckpt, name, run_id=run_id, tracking_uri=uri)["version"], flush=True)
"""


@pytest.mark.slow
def test_two_racing_registrations_get_distinct_versions(reg, tmp_path):
    name = unique("race")
    better = reg["runs"]["better"]
    go = tmp_path / "go"
    args = [reg["uri"], better["best_checkpoint"], name, better["mlflow"]["run_id"], str(go)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:  # both have imported everything and resolved the store: start together
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        go.touch()
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sorted(int(o[0].strip().splitlines()[-1]) for o in outs) == [1, 2]
    assert [v["version"] for v in trk.list_versions(name, tracking_uri=reg["uri"])["versions"]] == [1, 2]
