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


@pytest.mark.slow
def test_models_compare_names_each_versions_best_cells(registered, tmp_path, monkeypatch, capsys):
    from charlm.cli import main
    from charlm.datasets import open_dataset

    name, uri, store = registered["name"], registered["uri"], registered["store"]
    common = ["--tracking-uri", uri, "--store", store]
    capsys.readouterr()
    assert main(["models", "compare", name, "1", "--cells", "600", *common, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]["best_cells"]
    # the same cells `charlm visualize` finds on the same 600 characters
    ds = open_dataset(registered["dataset"], store)
    text = tmp_path / "split.txt"
    text.write_text(ds.vocab.decode(ds.splits["test"][:600]), encoding="utf-8")
    out = tmp_path / "p.html"
    args = [
        "visualize",
        f"models:/{name}/1",
        "--text",
        str(text),
        "--out",
        str(out),
        "--store",
        store,
        "--json",
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)["features"]
    assert set(got) == set(want)
    for k, f in want.items():
        assert got[k] == (f["best"][0] if f["best"] else None), k
    assert main(["models", "compare", name, "1", "--cells", "600", *common]) == 0
    printed = capsys.readouterr().out
    first = next(k for k, c in got.items() if c)
    assert (
        f"version 1 best cells: {first} L{got[first]['layer']} {got[first]['kind']}{got[first]['cell']}"
        in printed
    )
    assert main(["models", "compare", name, "1", *common, "--json"]) == 0  # off by default
    assert "best_cells" not in json.loads(capsys.readouterr().out)["results"][0]
