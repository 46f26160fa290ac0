"""The registered model as a service (charlm/tracking/serving.py, mlflow_model.py).

Fast: the request checks on their own, and the pyfunc loaded in this process (predict called
through MLflow's PyFuncModel, and on the Python model directly). Slow: a real
`mlflow models serve` of the registered version, driven over HTTP.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from charlm import capability
from charlm import tracking as trk
from charlm.config import SamplingParams
from charlm.tracking import serving
from charlm.vocab import UnknownCharactersError, Vocab

pytest_plugins = ["mlflow_fixtures"]
pytest.register_assert_rewrite("mlflow_fixtures")
from mlflow_fixtures import _free_port, corpus_text, unique  # noqa: E402

LIMITS = serving.Limits(max_length=2000, max_samples=16, max_steps=40_000, max_streams=40)
PARAMS = {"length": 30, "temperature": 0.9, "seed": 5, "num_samples": 2}


# -- the checks on their own ------------------------------------------------------------------------------------------
def test_check_params_fills_defaults_from_sampling_params():
    p = serving.check_params({}, LIMITS)
    defaults = SamplingParams()
    assert (p["length"], p["temperature"], p["top_k"], p["top_p"], p["seed"]) == (
        defaults.length,
        defaults.temperature,
        defaults.top_k,
        defaults.top_p,
        defaults.seed,
    )
    assert p["num_samples"] == 1 and p["stop"] == ""
    assert p["precision"] == capability.resolve("auto", "cpu", "sample")
    assert serving.check_params({"length": 7.0, "top_p": 1}, LIMITS)["length"] == 7


@pytest.mark.parametrize(
    "params, message",
    [
        ({"length": 0}, r"param length=0: out of range, want 1\.\.2000 \(CHARLM_MAX_LENGTH\)"),
        ({"length": -5}, r"param length=-5: out of range"),
        ({"length": 2001}, r"param length=2001: out of range, want 1\.\.2000"),
        ({"length": 2.5}, r"param length=2\.5: want a whole number"),
        ({"length": True}, r"param length=True: want a whole number"),
        ({"temperature": 0}, r"param temperature=0: out of range, want > 0"),
        ({"temperature": -1.0}, r"param temperature=-1\.0: out of range, want > 0"),
        ({"temperature": float("nan")}, r"param temperature=nan: want a number"),
        ({"top_k": -1}, r"param top_k=-1: out of range, want >= 0"),
        ({"top_p": 0}, r"param top_p=0: out of range, want in \(0, 1\]"),
        ({"top_p": 1.5}, r"param top_p=1\.5: out of range"),
        ({"num_samples": 0}, r"param num_samples=0: out of range, want 1\.\.16 \(CHARLM_MAX_SAMPLES\)"),
        ({"num_samples": 17}, r"param num_samples=17: out of range"),
        ({"precision": "fp64"}, r"param precision='fp64': want one of auto, fp32, bf16, int8"),
        ({"bogus": 1, "length": 3}, r"unknown params \['bogus'\]: known params are \['length', "),
    ],
)
def test_check_params_refuses_out_of_bounds(params, message):
    with pytest.raises(serving.ServingError, match=message) as e:
        serving.check_params(params, LIMITS)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and e.value.get_http_status_code() == 400
    assert "\n" not in e.value.message


def test_a_precision_this_host_lacks_is_refused_in_its_own_words(monkeypatch):
    bare = capability.Capabilities("cpu", ("fp32",), ("fp32",), (), {"int8": "no int8 kernel here"})
    monkeypatch.setattr(capability, "probe", lambda device="cpu": bare)
    with pytest.raises(capability.PrecisionUnavailable) as e:
        serving.check_params({"precision": "int8"}, LIMITS)
    assert isinstance(e.value, serving.ServingError)
    assert e.value.message == (
        "precision int8 cannot sample on cpu: no int8 kernel here; precisions that run here: fp32 (or auto)"
    )


def test_the_message_survives_mlflows_rewrite():
    e = serving.ServingError("param length=0: out of range\nsecond line")
    e.message = f"Failed to predict data 'frame'. \nError: {e.message}"  # what the scoring server does
    assert json.loads(e.serialize_as_json())["message"] == "param length=0: out of range"
    assert str(e) == "param length=0: out of range"


def test_prompts_from_every_accepted_shape():
    import numpy as np
    import pandas as pd

    assert serving.prompts_from_input(["a", "b"]) == ["a", "b"]
    assert serving.prompts_from_input("a") == ["a"]
    assert serving.prompts_from_input(pd.Series(["a", None])) == ["a", ""]
    assert serving.prompts_from_input(pd.DataFrame({"prompt": ["a"], "other": ["z"]})) == ["a"]
    assert serving.prompts_from_input(pd.DataFrame({"text": ["a", "b"]})) == ["a", "b"]
    assert serving.prompts_from_input({"prompt": np.array(["a", "b"])}) == ["a", "b"]
    assert serving.prompts_from_input(np.array([["a"], ["b"]])) == ["a", "b"]
    with pytest.raises(
        serving.ServingError, match=r"needs a 'prompt' column or exactly one column, got columns \['x', 'y'\]"
    ):
        serving.prompts_from_input(pd.DataFrame({"x": ["a"], "y": ["b"]}))
    with pytest.raises(
        serving.ServingError, match=r"mapping needs exactly the key 'prompt', got keys \['text'\]"
    ):
        serving.prompts_from_input({"text": ["a"]})
    with pytest.raises(serving.ServingError, match=r"prompt 2: want a string, got int"):
        serving.prompts_from_input(["a", 3])
    with pytest.raises(serving.ServingError, match=r"got shape \(1, 2\)"):
        serving.prompts_from_input(np.array([["a", "b"]]))


def test_check_request_caps_the_work_before_reading_the_prompts():
    vocab = Vocab.from_text("abc ")
    p = serving.check_params({"length": 1000, "num_samples": 10}, LIMITS)
    serving.check_request(["abc"] * 3, p, vocab, LIMITS)  # 30 streams x 1003 steps = 30,090
    with pytest.raises(
        serving.ServingError,
        match=r"request too large: 4 prompt\(s\) x 10 sample\(s\) x 1003 steps .* = 40,120 character steps, over the limit of 40,000 \(CHARLM_MAX_REQUEST_STEPS\)",
    ):
        serving.check_request(["abc", "", "", "Ω"], p, vocab, LIMITS)  # refused before the 'Ω'
    few = serving.check_params({"length": 1}, LIMITS)
    serving.check_request([""] * 40, few, vocab, LIMITS)
    with pytest.raises(
        serving.ServingError,
        match=r"request too large: 41 prompt\(s\) x 1 sample\(s\) = 41 streams, over the limit of 40 \(CHARLM_MAX_STREAMS\)",
    ):
        serving.check_request([""] * 41, few, vocab, LIMITS)  # 41 steps: only the streams are too many
    with pytest.raises(
        UnknownCharactersError,
        match=r"prompt 2 has 2 character\(s\) outside the vocabulary: 'Q' \(U\+0051\) x1, 'Ω' \(U\+03A9\) x2",
    ) as e:
        serving.check_request(["abc", "aQΩΩ"], p, vocab, LIMITS)
    assert isinstance(e.value, serving.ServingError) and e.value.unknown == {"Q": 1, "Ω": 2}


def test_limits_from_the_environment():
    assert serving.Limits.from_env({}) == serving.Limits(10_000, 256, 2_000_000, 1024)
    env = {
        "CHARLM_MAX_LENGTH": "50",
        "CHARLM_MAX_SAMPLES": " 4 ",
        "CHARLM_MAX_REQUEST_STEPS": "999",
        "CHARLM_MAX_STREAMS": "7",
    }
    assert serving.Limits.from_env(env) == serving.Limits(50, 4, 999, 7)
    with pytest.raises(
        ValueError, match=r"environment variable CHARLM_MAX_LENGTH='ten': want a whole number >= 1"
    ):
        serving.Limits.from_env({"CHARLM_MAX_LENGTH": "ten"})
    with pytest.raises(ValueError, match=r"CHARLM_MAX_REQUEST_STEPS='0'"):
        serving.Limits.from_env({"CHARLM_MAX_REQUEST_STEPS": "0"})


# -- a registered tiny model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(sqlite_tracking: str) -> Iterator[dict[str, Any]]:
    """A randomly initialised 1x48 LSTM over the fixtures' corpus alphabet, registered as
    version 1 of a new model with alias champion (the sampling contract needs no training)."""
    import torch

    from charlm import checkpoint
    from charlm.config import ModelConfig
    from charlm.model import CharLM

    folder = Path(tempfile.mkdtemp(prefix="charlm-serving-"))
    vocab = Vocab.from_text(corpus_text(0, 4000))
    cfg = ModelConfig(vocab_size=len(vocab), num_layers=1, hidden_size=48, embed_size=16, dropout=0.0)
    torch.manual_seed(7)
    path = folder / "model.pt"
    checkpoint.save(checkpoint.build(CharLM(cfg), cfg, vocab, step=1), path)
    store = str(folder / "store")
    name = unique("serve")
    with trk.start_run(tracking_uri=sqlite_tracking, store=store, experiment="serving-tests") as run:
        pass
    reg = trk.register_checkpoint(
        str(path), name, run_id=run.run_id, tracking_uri=sqlite_tracking, store=store
    )
    trk.promote(name, reg["version"], tracking_uri=sqlite_tracking)
    yield {"uri": sqlite_tracking, "store": store, "name": name, "checkpoint": str(path), "vocab": vocab}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pyfunc(registered: dict[str, Any]) -> Any:
    import mlflow

    trk.activate(registered["uri"])
    return mlflow.pyfunc.load_model(f"models:/{registered['name']}@champion")


def _cli_samples(checkpoint: str, prompts: list[str], params: dict[str, Any]) -> list[str]:
    from charlm.cli import main

    argv = ["sample", checkpoint, "--json"]
    for q in prompts:
        argv += ["--prime", q]
    flags = {
        "length": "--length",
        "temperature": "--temperature",
        "seed": "--seed",
        "num_samples": "--num-samples",
    }
    for k, v in params.items():
        argv += [flags[k], str(v)]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(argv) == 0
    return [s["text"] for s in json.loads(buf.getvalue().strip().splitlines()[-1])["samples"]]


def test_the_logged_model_declares_its_params_and_a_working_example(registered, pyfunc):
    import mlflow
    from mlflow.models import Model
    from mlflow.models.utils import load_serving_example

    sig = pyfunc.metadata.get_params_schema()
    assert {p.name: p.default for p in sig.params} == trk.PARAM_DEFAULTS
    assert {p.name: p.dtype.name for p in sig.params}["length"] == "long"
    assert {p.name: p.dtype.name for p in sig.params}["temperature"] == "double"
    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{registered['name']}/1", tracking_uri=registered["uri"]
    )
    model = Model.load(folder)
    example = model.load_input_example(folder)
    assert list(example["prompt"]) == ["The "] and model.load_input_example_params(folder)["num_samples"] == 2
    trk.activate(registered["uri"])
    payload = json.loads(load_serving_example(f"models:/{registered['name']}@champion"))
    assert payload["dataframe_split"]["columns"] == ["prompt"] and payload["params"]["length"] == 40


def test_pyfunc_predicts_what_charlm_sample_prints_in_one_batch(registered, pyfunc, monkeypatch):
    from charlm import sample

    calls = []
    original = sample.Sampler.generate

    def spy(self, prompts, length, **kw):
        calls.append(len(prompts))
        return original(self, prompts, length, **kw)

    monkeypatch.setattr(sample.Sampler, "generate", spy)
    got = pyfunc.predict(["The ", "quick"], params=PARAMS)
    assert calls == [4]  # 2 prompts x 2 samples: one batch
    assert got == _cli_samples(registered["checkpoint"], ["The ", "quick"], PARAMS)
    assert len(set(got)) == 4 and all(len(t) == 30 for t in got)


@pytest.mark.parametrize(
    "data, params, message",
    [
        (["The "], {"length": 0}, r"^param length=0: out of range, want 1\.\.10000 \(CHARLM_MAX_LENGTH\)$"),
        (["The "], {"temperature": -1.0}, r"^param temperature=-1\.0: out of range, want > 0$"),
        (["The "], {"num_samples": 0}, r"^param num_samples=0: out of range"),
        (["The "], {"precision": "fp64"}, r"^param precision='fp64': want one of"),
        (["The Ω"], {}, r"^prompt has 1 character\(s\) outside the vocabulary: 'Ω' \(U\+03A9\) x1$"),
        ("two-columns", {}, r"^input: a DataFrame needs a 'prompt' column or exactly one column"),
        (["The "], {"bogus": 1}, r"^unknown params \['bogus'\]: known params are "),
    ],
)
def test_pyfunc_refuses_bad_requests(pyfunc, data, params, message):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    if data == "two-columns":
        data = pd.DataFrame({"x": ["The "], "y": ["a"]})
    for predict in (pyfunc.predict, lambda d, params: pyfunc.unwrap_python_model().predict(None, d, params)):
        with pytest.raises(MlflowException) as e:
            predict(data, params={"length": 5, **params})
        assert e.value.error_code == "INVALID_PARAMETER_VALUE"
        assert e.value.message == str(e.value)
        assert re.search(message, e.value.message), e.value.message


def test_unknown_params_are_refused_only_in_their_own_call(pyfunc):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="Invalid parameters found"):  # MLflow's own type check
        pyfunc.predict(["The "], params={"bogus": 1, "length": "many"})
    # its warning about 'bogus' was seen, but belongs to the call that failed before predict
    assert len(pyfunc.predict(["The "], params={"length": 5})) == 1
    with pytest.raises(serving.ServingError, match=r"unknown params \['bogus', 'zzz'\]"):
        pyfunc.predict(["The "], params={"bogus": 1, "zzz": 2, "length": 5})
    assert len(pyfunc.predict(["The "], params={"length": 5})) == 1


# -- the real server --------------------------------------------------------------------------------------------------
SERVER_ENV = {"CHARLM_MAX_LENGTH": "3000", "CHARLM_MAX_SAMPLES": "64", "CHARLM_MAX_REQUEST_STEPS": "100000"}


@pytest.fixture(scope="module")
def server(registered: dict[str, Any]) -> Iterator[str]:
    """`mlflow models serve` of models:/NAME@champion on 127.0.0.1 with tighter limits."""
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH
    env = {
        **os.environ,
        **SERVER_ENV,
        "MLFLOW_TRACKING_URI": registered["uri"],
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    log = Path(tempfile.mkdtemp(prefix="charlm-serve-")) / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(str(Path(bin_dir) / "mlflow"), "models", "serve"),
                *("-m", f"models:/{registered['name']}@champion", "--env-manager", "local"),
                *("-h", "127.0.0.1", "-p", str(port), "-w", "1"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow models serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve not ready after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and its uvicorn workers: the group we started
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(5)
        shutil.rmtree(log.parent, ignore_errors=True)


def _post(url: str, payload: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        url + "/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_served_model_answers_every_payload_form_as_charlm_sample_does(server, registered):
    want = _cli_samples(registered["checkpoint"], ["The ", "quick"], PARAMS)
    forms = [
        {"dataframe_records": [{"prompt": "The "}, {"prompt": "quick"}]},
        {"dataframe_split": {"columns": ["prompt"], "data": [["The "], ["quick"]]}},
        {"inputs": ["The ", "quick"]},
        {"inputs": {"prompt": ["The ", "quick"]}},
    ]
    for form in forms:
        status, body = _post(server, {**form, "params": PARAMS})
        assert (status, body) == (200, {"predictions": want}), form


@pytest.mark.slow
def test_served_model_answers_concurrent_requests_alike(server):
    payloads = [
        {"inputs": ["The "], "params": {**PARAMS, "seed": s, "num_samples": 1 + s % 3}} for s in range(8)
    ]
    alone = [_post(server, p) for p in payloads]
    together: list[Any] = [None] * len(payloads)

    def post(i: int) -> None:
        together[i] = _post(server, payloads[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone and all(status == 200 for status, _ in alone)


@pytest.mark.slow
@pytest.mark.parametrize(
    "payload, message",
    [
        ({"params": {"length": -5}}, "param length=-5: out of range, want 1..3000 (CHARLM_MAX_LENGTH)"),
        ({"params": {"length": 0}}, "param length=0: out of range, want 1..3000 (CHARLM_MAX_LENGTH)"),
        (
            {"params": {"length": 10**8}},
            "param length=100000000: out of range, want 1..3000 (CHARLM_MAX_LENGTH)",
        ),
        ({"params": {"temperature": -1}}, "param temperature=-1.0: out of range, want > 0"),
        ({"params": {"temperature": 0}}, "param temperature=0.0: out of range, want > 0"),
        ({"params": {"top_p": 0}}, "param top_p=0.0: out of range, want in (0, 1]"),
        ({"params": {"top_k": -2}}, "param top_k=-2: out of range, want >= 0 (0 keeps every character)"),
        (
            {"params": {"num_samples": 0}},
            "param num_samples=0: out of range, want 1..64 (CHARLM_MAX_SAMPLES)",
        ),
        ({"params": {"precision": "fp64"}}, "param precision='fp64': want one of auto, fp32, bf16, int8"),
        (
            {"dataframe_records": [{"prompt": "The Ωmega"}]},
            "prompt has 1 character(s) outside the vocabulary: 'Ω' (U+03A9) x1",
        ),
        (
            {"dataframe_records": [{"text": "The ", "other": "x"}]},
            "input: a DataFrame needs a 'prompt' column or exactly one column, got columns ['text', 'other']",
        ),
        (
            {"params": {"length": 5, "bogus": 1}},
            "unknown params ['bogus']: known params are "
            "['length', 'num_samples', 'precision', 'seed', 'stop', 'temperature', 'top_k', 'top_p']",
        ),
    ],
)
def test_served_model_refuses_bad_requests_with_charlms_line(server, payload, message):
    status, body = _post(server, {"dataframe_records": [{"prompt": "The "}], **payload})
    assert status == 400
    assert body == {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": message,
        "sqlstate": body.get("sqlstate"),
        "error_class": "INVALID_PARAMETER_VALUE",
    }  # no stack_trace, no "Failed to predict data ..."


@pytest.mark.slow
def test_served_model_refuses_an_oversized_request_before_any_work(server):
    # 64 samples x (4 + 3000) steps = 192,256 > 100,000: at a few thousand characters a second
    # here it would run for minutes
    payload = {"inputs": ["The "], "params": {"length": 3000, "num_samples": 64}}
    t0 = time.perf_counter()
    status, body = _post(server, payload)
    took = time.perf_counter() - t0
    print(f"oversized request refused in {took * 1000:.0f} ms")
    assert status == 400 and body["message"].startswith(
        "request too large: 1 prompt(s) x 64 sample(s) x 3004 steps"
    )
    assert "(CHARLM_MAX_REQUEST_STEPS)" in body["message"]
    assert took < 5
    status, body = _post(server, {"inputs": ["The "], "params": {"length": 5}})
    assert status == 200 and len(body["predictions"][0]) == 5  # and the server is free
