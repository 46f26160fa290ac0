"""The capability probe, `charlm info`, the refusal of a precision a machine cannot run, and the
numeric claims the README makes about bf16 training and int8 sampling, at tiny sizes.

Tests marked `hardware` run once as the machine is and, from scripts/test, once more with every
CPU library capped at AVX2 (capability.CAPS["avx2"]): the refusals then run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from charlm import capability
from charlm.cli import main
from charlm.config import TrainConfig
from charlm.data import split_ids
from charlm.sample import Sampler
from charlm.train import Callback, train
from charlm.vocab import Vocab

TEXT = "the quick brown fox jumps over the lazy dog. " * 60
BARE = capability.Capabilities(
    "cpu", ("fp32",), ("fp32",), (), {"bf16": "no bf16 in this test", "int8": "no int8 in this test"}
)


def _cfg(**kw) -> TrainConfig:
    base = dict(hidden_size=32, embed_size=8, seq_len=16, batch_size=4, max_steps=60, eval_every=30)
    base.update(warmup_steps=5, lr=1e-2, dropout=0.0, ema=0.0, seed=3, precision="fp32", log_every=10)
    base.update(kw)
    return TrainConfig(**base)


def _data():
    vocab = Vocab.from_text(TEXT)
    return vocab, split_ids(vocab.encode(TEXT), 0.1, 0.0)


def test_the_probe_reports_what_runs():
    caps = capability.probe("cpu")
    assert caps.train[0] == caps.sample[0] == "fp32"
    assert set(caps.train) <= {"fp32", "bf16"} and set(caps.sample) <= {"fp32", "bf16", "int8"}
    assert ("int8" in caps.sample) == bool(caps.int8_kernels)
    for precision in ("bf16", "int8"):  # each precision is either there or said to be missing
        assert (precision in caps.sample) != (precision in caps.missing)
    assert capability.probe(torch.device("cpu")) is caps  # probed once, whatever names the device
    if torch.cuda.is_available():
        assert "int8" not in capability.probe("cuda").sample


def test_capped_at_avx2_the_probe_finds_the_avx2_kernels():
    """The cap makes an AVX-512 machine behave as an AVX2-only one (no bf16 kernels, int8 products
    saturate in oneDNN): the probe must find that by running, not by reading CPU flags."""
    if not capability.cpu_flags()["avx2"]:
        pytest.skip("this CPU has no AVX2")
    code = "import json; from charlm import capability; print(json.dumps(capability.report()))"
    env = {**os.environ, **capability.CAPS["avx2"]}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    rep = json.loads(out.stdout)
    cpu = rep["capabilities"]["cpu"]
    assert rep["aten_cpu_capability"] == "AVX2" and rep["isa_caps"] == capability.CAPS["avx2"]
    assert cpu["train"] == ["fp32"] and cpu["sample"] == ["fp32", "int8"]
    assert cpu["int8_kernels"] == ["fbgemm-avx2"] and cpu["auto"] == {"train": "fp32", "sample": "int8"}
    assert "AVX512-BF16 or AMX" in cpu["missing"]["bf16"]


def test_an_unavailable_precision_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(capability, "probe", lambda device="cpu": BARE)
    vocab, splits = _data()
    with pytest.raises(capability.PrecisionUnavailable) as e:
        train(_cfg(precision="bf16"), vocab, splits, device="cpu")
    assert str(e.value) == (
        "precision bf16 cannot train on cpu: no bf16 in this test; precisions that run here: fp32 (or auto)"
    )
    assert capability.resolve("auto", "cpu", "train") == "fp32"
    assert capability.resolve("auto", "cpu", "sample") == "fp32"
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'fp32', 'bf16'\), got 'fp8'"):
        capability.resolve("fp8", "cpu", "train")


@pytest.mark.hardware
def test_cli_refuses_a_precision_this_machine_cannot_train_before_any_work(tmp_path, capsys, monkeypatch):
    """Real where this machine (or the AVX2 cap) has no native bf16; else with the probe replaced."""
    if "bf16" in capability.probe("cpu").train:
        monkeypatch.setattr(capability, "probe", lambda device="cpu": BARE)
    why = capability.probe("cpu").missing["bf16"]
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "run"
    args = ["train", str(corpus), "--out", str(out), "--precision", "bf16", "--max-steps", "2", "--no-track"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == (
        f"charlm: error: precision bf16 cannot train on cpu: {why}; precisions that run here: fp32 (or auto)\n"
    )
    assert not out.exists()  # refused before any work
    assert main(["sample", str(out), "--precision", "bf16"]) == 1  # before the model is looked up
    assert capsys.readouterr().err.startswith("charlm: error: precision bf16 cannot sample on cpu: ")
    store = tmp_path / "store"
    pipeline = [
        "pipeline",
        str(corpus),
        "--name",
        "c",
        "--store",
        str(store),
        "--precision",
        "bf16",
        "--no-gpu",
    ]
    assert main(pipeline) == 1
    assert capsys.readouterr().err.startswith("charlm: error: precision bf16 cannot train on cpu: ")
    assert not store.exists()  # nothing ingested


@pytest.mark.hardware
def test_info_prints_the_probe_versions_and_where_things_are(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["info", "--store", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["capabilities"]["cpu"] == capability.probe("cpu").to_dict()
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"] == (
        torch.__version__
    )
    assert set(info["cpu_flags"]) <= set(capability.CPU_FLAGS) and info["threads"] == torch.get_num_threads()
    assert info["store"] == str(store) and info["tracking_uri"] == f"sqlite:///{store}/mlflow.db"
    assert {"ray", "prefect", "mlflow"} <= set(info["versions"]) and info["versions"]["mlflow"]
    assert not store.exists()  # info creates nothing
    assert main(["info", "--store", str(store)]) == 0
    text = capsys.readouterr().out
    for line in ("cpu:", "versions:", "store:", "tracking uri:", "ray address:"):
        assert line in text
    assert f"sample {', '.join(capability.probe('cpu').sample)}" in text


@pytest.mark.hardware
def test_bf16_training_stays_within_the_readme_bound_of_fp32():
    """README: bf16 within 0.01 nats/char of fp32 at equal steps (docs/benchmarks.md measures it
    on tinyshakespeare). Here, at 60 steps of a tiny model: measured -0.0015 (seeds 4, 5: -0.0009,
    +0.0019), on AMX; the bound is ~2.5x that, well inside the README's 0.01."""
    if "bf16" not in capability.probe("cpu").train:
        pytest.skip(f"bf16: {capability.probe('cpu').missing['bf16']}")
    vocab, splits = _data()
    fp32 = train(_cfg(), vocab, splits, device="cpu")["best_val_loss"]
    bf16 = train(_cfg(precision="bf16"), vocab, splits, device="cpu")["best_val_loss"]
    assert abs(bf16 - fp32) < 0.004, (fp32, bf16)


class _Keep(Callback):
    def on_end(self, run, result):
        self.model = run.eval_model


@pytest.fixture(scope="module")
def small_trained():
    """A model that has learned something, and 1,600 characters it was not trained on, as 8
    streams (x, y), each (8, 200)."""
    vocab = Vocab.from_text(TEXT)
    ids = vocab.encode(TEXT)
    keep = _Keep()
    train(_cfg(hidden_size=64, max_steps=150, eval_every=150), vocab, {"train": ids[:-1601], "val": ids[-1601:]},
          callbacks=[keep], device="cpu")  # fmt: skip
    held = torch.from_numpy(ids[-1601:].astype(np.int64))
    return keep.model.eval(), vocab, held[:-1].view(8, 200), held[1:].view(8, 200)


@pytest.mark.hardware
@pytest.mark.parametrize("kernel", ["onednn-vnni", "fbgemm-avx2"])
def test_int8_sampling_stays_near_fp32(small_trained, kernel):
    """README: int8 sampling within 0.0003 nats/char of fp32 on tinyshakespeare models
    (bench/sample_fidelity.py). On this small model (fp32 0.0945 nats/char), measured +0.000050
    (onednn-vnni: 8-bit inputs) and +0.000139 (fbgemm-avx2: 7-bit inputs, the same capped at
    AVX2); each bound is ~2x its kernel's figure, so an error twice as large fails."""
    caps = capability.probe("cpu")
    if kernel not in caps.int8_kernels:
        pytest.skip(f"the {kernel} int8 kernel is not exact on this CPU (kernels here: {caps.int8_kernels})")
    model, vocab, x, y = small_trained
    fp32 = Sampler(model, vocab, precision="fp32", max_batch=8).score(x, y)
    int8 = Sampler(model, vocab, precision="int8", int8_kernel=kernel, max_batch=8).score(x, y)
    bound = {"onednn-vnni": 0.0001, "fbgemm-avx2": 0.00028}[kernel]
    assert abs(int8 - fp32) < bound, (fp32, int8, int8 - fp32)
