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


@pytest.mark.slow
def test_visualize_a_registered_version(sqlite_tracking, tiny_datasets, tmp_path, monkeypatch, capsys):
    from charlm.cli import main, run_local_training
    from charlm.datasets import load
    from charlm.refs import resolve_data

    store, dataset = tiny_datasets["store"], tiny_datasets["main"]
    name = unique("viz")
    out = tmp_path / "run"
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
    trk.promote(name, 1, alias="champion", tracking_uri=sqlite_tracking, store=store)
    ref = resolve_data(dataset, store)
    ds = load(ref.url, ref.manifest)
    text = tmp_path / "test.txt"
    text.write_text(ds.vocab.decode(ds.splits["test"][:600]), encoding="utf-8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_tracking)
    capsys.readouterr()
    for ref, label in (
        (f"models:/{name}/1", f"models:/{name}/1"),
        (f"models:/{name}@champion", f"models:/{name}/1 (@champion)"),
    ):
        page = tmp_path / "page.html"
        assert (
            main(["visualize", ref, "--text", str(text), "--out", str(page), "--store", store, "--json"]) == 0
        )
        res = json.loads(capsys.readouterr().out)
        assert res["model"] == label and res["dataset"] == dataset and res["chars"] == 600
        data = json.loads(
            re.search(r'id="data">(.*?)</script>', Path(page).read_text(encoding="utf-8"), re.S).group(1)
        )
        assert data["meta"]["model"] == label and data["meta"]["dataset"] == dataset
