"""charlm visualize on a registered version: models:/NAME/VERSION and models:/NAME@ALIAS resolve
through the registry, and the page names the version and its dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from charlm import tracking as trk

pytest_plugins = ["mlflow_fixtures"]
pytest.register_assert_rewrite("mlflow_fixtures")
from mlflow_fixtures import tiny_config, unique  # noqa: E402


@pytest.fixture(scope="module")
def registered(sqlite_tracking, tiny_datasets, tmp_path_factory):
    """One version of a new model, trained 20 steps on the 'main' dataset."""
    from charlm.cli import run_local_training

    store, dataset = tiny_datasets["store"], tiny_datasets["main"]
    name = unique("viz")
    out = tmp_path_factory.mktemp("viz-reg") / "run"
    trk.tracked_training(
        lambda tr: run_local_training(
            tiny_config(max_steps=20, eval_every=10),
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
        tracking_uri=sqlite_tracking,
        experiment="visualize-tests",
    )
    return {"name": name, "uri": sqlite_tracking, "store": store, "dataset": dataset}


@pytest.mark.slow
def test_visualize_a_registered_version(registered, tmp_path, monkeypatch, capsys):
    from charlm.cli import main
    from charlm.datasets import load
    from charlm.refs import resolve_data

    name, sqlite_tracking, store, dataset = (registered[k] for k in ("name", "uri", "store", "dataset"))
    trk.promote(name, 1, alias="champion", tracking_uri=sqlite_tracking, store=store)
    ref = resolve_data(dataset, store)
    ds = load(ref.url, ref.manifest)
    text = tmp_path / "test.txt"
    text.write_text(ds.vocab.decode(ds.splits["test"][:600]), encoding="utf-8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_tracking)
    capsys.readouterr()
    for model_ref, label in (
        (f"models:/{name}/1", f"models:/{name}/1"),
        (f"models:/{name}@champion", f"models:/{name}/1 (@champion)"),
    ):
        page = tmp_path / "page.html"
        assert (
            main(
                ["visualize", model_ref, "--text", str(text), "--out", str(page), "--store", store, "--json"]
            )
            == 0
        )
        res = json.loads(capsys.readouterr().out)
        assert res["model"] == label and res["dataset"] == dataset and res["chars"] == 600
        data = json.loads(
            re.search(r'id="data">(.*?)</script>', Path(page).read_text(encoding="utf-8"), re.S).group(1)
        )
        assert data["meta"]["model"] == label and data["meta"]["dataset"] == dataset


@pytest.mark.slow
def test_the_evaluate_flow_logs_the_candidates_page(registered, prefect_harness):
    from flows.evaluate import evaluate_and_promote

    name, uri, store = registered["name"], registered["uri"], registered["store"]
    d = evaluate_and_promote(name, "1", alias="viz-eval", tracking_uri=uri, store=store)
    assert d["decision"] == "promoted"
    client = trk._activate(uri)
    run_id = client.get_model_version(name, "1").run_id
    assert d["page"] == f"{client.get_run(run_id).info.artifact_uri}/visualize/{name}-v1.html"
    page = Path(client.download_artifacts(run_id, f"visualize/{name}-v1.html")).read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1))
    assert data["meta"]["model"] == f"models:/{name}/1" and data["meta"]["dataset"] == registered["dataset"]
    assert 0 < len(data["text"]) <= 10_000
