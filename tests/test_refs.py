"""References resolved once: corpus, dataset and model strings to typed values (charlm.refs), and
the rules that keep dataset names and ids apart (charlm.datasets.locate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from charlm import datasets, ingest, refs, storage
from charlm.corpus import DEFAULT_CORPUS
from charlm.ingest import Policies


def _corpus(tmp_path, text: str = "hello world\n" * 10) -> str:
    src = tmp_path / "corpus"
    src.mkdir(exist_ok=True)
    (src / "a.txt").write_text(text)
    return str(src)


def test_corpus_references(tmp_path, tmp_store) -> None:
    src = _corpus(tmp_path)
    assert refs.resolve_data(DEFAULT_CORPUS, tmp_store) == refs.CorpusRef(DEFAULT_CORPUS)
    got = refs.resolve_data(src + "/a.txt", tmp_store)
    assert isinstance(got, refs.CorpusRef) and got.given == src + "/a.txt"
    assert refs.resolve_data(got, tmp_store) is got  # typed values pass through
    with pytest.raises(refs.RefError, match=r"^nothing-here: not a file, folder, dataset id, dataset name"):
        refs.resolve_data("nothing-here", tmp_store)


def test_dataset_reference_reads_the_manifest_once(tmp_path, tmp_store, monkeypatch) -> None:
    r = ingest.ingest(_corpus(tmp_path), tmp_store, name="hello")
    reads = []
    real = datasets.read_manifest
    monkeypatch.setattr(datasets, "read_manifest", lambda f: reads.append(f) or real(f))
    got = refs.resolve_data("hello", tmp_store)
    assert isinstance(got, refs.DatasetRef) and got.id == r["id"] and got.url == r["url"]
    assert got.name == "hello" and got.note is None and got.label == f"dataset {r['id']}"
    n = len(reads)
    from charlm.tracking.lineage import describe_dataset
    from charlm.trainingdata import load_training_data

    info = describe_dataset(got, tmp_store)
    _, splits, fp, label = load_training_data(got, 0.05, 0.05, tmp_store)
    assert info.id == r["id"] and info.manifest == got.manifest and fp == got.fingerprint
    assert label == got.label and len(splits["train"]) > 0
    assert len(reads) == n  # the layers below took the manifest the edge read


def test_names_and_ids_never_collide(tmp_path, tmp_store) -> None:
    src = _corpus(tmp_path)
    first = ingest.ingest(src, tmp_store, name="poems")
    second = ingest.ingest(src, tmp_store, Policies(newlines="keep"), name="poems")
    # NAME is the newest and says so; NAME@N picks the N-th, oldest first
    newest = datasets.locate("poems", tmp_store)
    assert newest.url == second["url"] and "newest of 2" in newest.note and "poems@1" in newest.note
    assert datasets.locate("poems@1", tmp_store).url == first["url"]
    assert datasets.locate("poems@2", tmp_store).note is None
    with pytest.raises(datasets.DatasetNotFoundError, match=r"poems@3: dataset poems has versions 1\.\.2"):
        datasets.locate("poems@3", tmp_store)
    rows = datasets.list_datasets(tmp_store)
    assert [(d["name"], d["version"]) for d in rows] == [("poems", 1), ("poems", 2)]
    # id:PREFIX is only ever an id
    assert datasets.locate("id:" + first["id"][:8], tmp_store).url == first["url"]
    with pytest.raises(datasets.DatasetNotFoundError, match="id:abcdef: no dataset id starts with abcdef"):
        datasets.locate("id:abcdef", tmp_store)
    # a name that reads as an id prefix is refused at ingest, before any work
    with pytest.raises(ingest.IngestError, match="reads as a dataset id prefix"):
        ingest.ingest(src, tmp_store, name=first["id"][:6])
    for bad in ("a/b", "v@2", "id:x", " x"):
        with pytest.raises(ingest.IngestError, match="dataset name"):
            ingest.ingest(src, tmp_store, name=bad)


def test_hex_name_shadowed_by_an_id_prefix_is_refused(tmp_path, tmp_store) -> None:
    """A dataset published under a hex-looking name (before names were checked) and another
    whose id starts with those digits: the bare string lists both instead of picking one."""
    r = ingest.ingest(_corpus(tmp_path), tmp_store)
    prefix = r["id"][:6]
    m = dict(datasets.read_manifest(r["url"]), id="f" * 64, name=prefix)
    storage.write_text_atomic(storage.join(tmp_store, "datasets", "f" * 64, "manifest.json"), json.dumps(m))
    with pytest.raises(
        datasets.DatasetError, match=rf"{prefix}: is both a dataset name and an id prefix.*id:{prefix}"
    ):
        datasets.locate(prefix, tmp_store)
    assert datasets.locate(f"id:{prefix}", tmp_store).url == r["url"]
    assert datasets.locate(f"{prefix}@1", tmp_store).manifest["id"] == "f" * 64


def test_model_references(tmp_path) -> None:
    assert refs.resolve_model("models:/m@champion") == refs.RegistryRef("m", None, "champion")
    assert refs.resolve_model("models:/m/3").uri == "models:/m/3"
    assert refs.resolve_model("models:/m/latest") == refs.RegistryRef("m")
    assert refs.resolve_model("runs:/abc/model") == refs.MlflowRunRef("runs:/abc/model")
    with pytest.raises(refs.RefError, match="models:/m: not a model reference"):
        refs.resolve_model("models:/m")
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    assert refs.resolve_model(str(run)) == refs.CheckpointRef(str(run / "last.pt"), run=str(run))
    (run / "best.pt").write_bytes(b"x")
    assert refs.resolve_model(str(run)).url == str(run / "best.pt")
    assert refs.resolve_model(str(run), which="last").url == str(run / "last.pt")
    assert refs.resolve_model(str(run / "best.pt")) == refs.CheckpointRef(str(run / "best.pt"))
    named = tmp_path / "store" / "runs" / "r1"
    named.mkdir(parents=True)
    (named / "best.pt").write_bytes(b"x")
    got = refs.resolve_model("r1", store=str(tmp_path / "store"))
    assert got.url == str(named / "best.pt") and got.run == "r1"  # a run's bare name in the store
    with pytest.raises(refs.RefError, match=r"/no/such\.pt: no such checkpoint file"):
        refs.resolve_model("/no/such.pt")


def test_cli_says_which_of_several_datasets_it_took(tmp_path, tmp_store) -> None:
    src = _corpus(tmp_path, "abcdefgh ijklmnop\n" * 200)
    ingest.ingest(src, tmp_store, name="poems")
    newer = ingest.ingest(src, tmp_store, Policies(newlines="keep"), name="poems")
    env = {**os.environ, "CHARLM_STORE": tmp_store, "MLFLOW_ENABLE_TELEMETRY": "false"}
    res = subprocess.run(
        [sys.executable, "-m", "charlm.cli", "train", "poems", "--out", str(tmp_path / "out"), "--no-track",
         "--max-steps", "2", "--num-layers", "1", "--hidden-size", "8", "--embed-size", "4",
         "--batch-size", "2", "--seq-len", "8", "--eval-every", "2", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "charlm: dataset poems: the newest of 2 datasets" in res.stderr
    assert json.loads(res.stdout)["corpus"] == f"dataset {newer['id']}"
