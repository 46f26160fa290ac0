"""The `charlm` command: train, sample, --json, --resume, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from charlm import capability
from charlm.cli import main

TINY = ["--hidden-size", "32", "--embed-size", "8", "--batch-size", "4", "--seq-len", "16", "--lr", "1e-2"]


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("To be, or not to be, that is the question:\r\n" * 80, encoding="utf-8")
    return p


def _json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # one JSON object, nothing else, on stdout
    return json.loads(out[0])


@pytest.mark.hardware
def test_train_then_sample_json(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(corpus),
                "--out",
                str(out),
                "--max-steps",
                "20",
                "--eval-every",
                "10",
                *TINY,
                "--json",
            ]
        )
        == 0
    )
    summary = _json(capsys)
    assert summary["steps"] == 20 and summary["out_dir"] == str(out)
    assert summary["best_val_loss"] < 3.0 and summary["chars_per_s"] > 0
    assert summary["mlflow"]["run_id"]  # every training run is an MLflow run unless --no-track
    assert {p.name for p in out.iterdir()} >= {
        "last.pt",
        "best.pt",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
    }
    assert "\r" not in json.loads((out / "config.json").read_text())["corpus"]

    assert (
        main(
            [
                "sample",
                str(out),
                "--prime",
                "To be",
                "--length",
                "30",
                "--num-samples",
                "3",
                "--seed",
                "4",
                "--json",
            ]
        )
        == 0
    )
    res = _json(capsys)
    texts = [s["text"] for s in res["samples"]]
    assert len(texts) == 3 and all(len(t) == 30 for t in texts) and len(set(texts)) > 1
    assert res["precision"] == capability.probe("cpu").auto_sample  # what auto resolved to
    assert (
        main(
            [
                "sample",
                str(out / "best.pt"),
                "--prime",
                "To be",
                "--length",
                "30",
                "--num-samples",
                "3",
                "--seed",
                "4",
                "--json",
            ]
        )
        == 0
    )
    assert [s["text"] for s in _json(capsys)["samples"]] == texts  # same seed, same text
    fp32 = ["sample", str(out), "--prime", "To be", "--length", "30", "--precision", "fp32", "--json"]
    assert main(fp32) == 0 and _json(capsys)["precision"] == "fp32"


def test_sample_streams_one_sample_to_stdout(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    main(["train", str(corpus), "--out", str(out), "--max-steps", "5", *TINY, "--no-track", "--json"])
    capsys.readouterr()
    assert main(["sample", str(out), "--prime", "or not", "--length", "25", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    # the prime, exactly --length characters (no --stop to cut them short), one newline
    assert printed.startswith("or not") and printed.endswith("\n") and len(printed) == 6 + 25 + 1
    as_json = ["sample", str(out), "--prime", "or not", "--length", "25", "--seed", "1", "--json"]
    assert main(as_json) == 0
    assert printed == "or not" + _json(capsys)["samples"][0]["text"] + "\n"  # what was streamed


def test_resume_refuses_to_overwrite_and_continues(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["train", str(corpus), "--out", str(out), *TINY, "--eval-every", "10", "--no-track", "--json"]
    assert main([*args, "--max-steps", "10"]) == 0
    capsys.readouterr()
    assert main([*args, "--max-steps", "20"]) == 1
    assert "already holds a training run" in capsys.readouterr().err
    assert main([*args, "--max-steps", "20", "--resume"]) == 0
    assert _json(capsys)["steps"] == 20


def test_errors_are_one_line_naming_the_object(tmp_path, corpus, capsys):
    assert main(["train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.txt" in err[0] and err[0].startswith("charlm: error:")

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text " * 100 + b"\xff\xfe broken")
    assert main(["train", str(bad), "--out", str(tmp_path / "o"), "--json"]) == 1
    err = capsys.readouterr().err
    assert "bad.txt" in err and "invalid UTF-8 at byte offset 1000" in err

    args = ["train", str(corpus), "--out", str(tmp_path / "o2"), "--batch-size", "512", "--seq-len", "100"]
    assert main([*args, "--json"]) == 1
    err = capsys.readouterr().err
    assert "corpus.txt has 3,440 characters" in err and "needs at least 51,201" in err
    assert not (tmp_path / "o2" / "last.pt").exists()

    assert (
        main(
            [
                "train",
                str(corpus),
                "--out",
                str(tmp_path / "o3"),
                "--batch-size",
                "512",
                "--auto-shrink",
                "--max-steps",
                "2",
                *TINY[:4],
                "--json",
            ]
        )
        == 0
    )
    assert _json(capsys)["batch_size"] < 512


def test_cli_process_exit_code_and_help():
    res = subprocess.run(
        [sys.executable, "-m", "charlm.cli", "sample", "/no/such.pt"], capture_output=True, text=True
    )
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip() == "charlm: error: /no/such.pt: no such checkpoint file"
    helptext = subprocess.run(
        [sys.executable, "-m", "charlm.cli", "train", "--help"], capture_output=True, text=True
    ).stdout
    for flag in (
        "--cell",
        "--num-layers",
        "--hidden-size",
        "--dropout",
        "--seq-len",
        "--batch-size",
        "--lr",
        "--max-steps",
        "--max-epochs",
        "--time-budget",
        "--eval-every",
        "--precision",
        "--seed",
        "--resume",
        "--auto-shrink",
        "--json",
    ):
        assert flag in helptext


def test_train_accepts_a_dataset_id_and_name(tmp_path, capsys):
    from charlm.ingest import Policies, ingest

    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("It was the best of times, it was the worst of times.\n" * 60)
    (src / "b.txt").write_text("It was the age of wisdom, it was the age of foolishness.\n" * 60)
    store = str(tmp_path / "store")
    ds = ingest([str(src)], store, Policies(val_frac=0.1, test_frac=0.1), name="dickens")
    for i, ref in enumerate((ds["id"], ds["id"][:10], "dickens")):
        out = tmp_path / f"run-{i}"
        args = [
            "train",
            ref,
            "--store",
            store,
            "--out",
            str(out),
            "--max-steps",
            "3",
            *TINY,
            "--no-track",
            "--json",
        ]
        assert main(args) == 0
        summary = _json(capsys)
        assert summary["corpus"] == f"dataset {ds['id']}" and summary["corpus_fingerprint"] == ds["id"]
    assert main(["train", "0123456789ab", "--store", store, "--out", str(tmp_path / "x"), "--json"]) == 1
    assert "0123456789ab" in capsys.readouterr().err


def test_train_flags_come_from_the_config_fields() -> None:
    """Every TrainConfig field has its --flag with the field's default, and char-rnn's spellings
    set the same fields: a default changed in config.py is the CLI's default, with nothing to
    keep in step by hand."""
    import dataclasses

    from charlm.cli import build_parser, train_config_from_args
    from charlm.config import TrainConfig

    parser = build_parser()
    a = parser.parse_args(["train", "corpus.txt"])
    for f in dataclasses.fields(TrainConfig):
        assert hasattr(a, f.name), f"no flag for TrainConfig.{f.name}"
        assert getattr(a, f.name) == f.default, f.name
    got = train_config_from_args(
        parser.parse_args(
            [
                "train",
                "c",
                "--rnn-size",
                "96",
                "--seq-length",
                "33",
                "--learning-rate",
                "0.01",
                "--model",
                "gru",
            ]
        )
    )
    assert (got.hidden_size, got.seq_len, got.lr, got.cell, got.max_epochs) == (96, 33, 0.01, "gru", 10)
    assert train_config_from_args(parser.parse_args(["train", "c", "--auto-shrink"])).auto_shrink is True


def test_os_errors_in_charlms_words(monkeypatch, capsys) -> None:
    """An OS error that escapes a command is said as '<path>: <what is wrong> (<errno text>)',
    not Python's '[Errno 17] File exists: ...'."""
    import errno

    from charlm import cli
    from charlm.errors import os_error_line

    def boom(a):
        raise FileExistsError(errno.EEXIST, "File exists", "/data/out")

    monkeypatch.setattr(cli, "cmd_sample", boom)
    assert cli.main(["sample", "whatever.pt"]) == 1
    assert capsys.readouterr().err.strip() == "charlm: error: /data/out: already exists (File exists)"
    assert os_error_line(NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x")) == (
        "/f/x: a part of the path is a file, not a folder (Not a directory)"
    )
    assert os_error_line(OSError("no path")) is None
