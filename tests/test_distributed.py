"""Distributed training under Ray Train: DDP workers, checkpoints in the store, fault tolerance.

The slow tests share one local Ray (2 CPUs) and one S3 store on the test S3 server, and all train
the same tiny model on the same dataset, so every run can be compared with the uninterrupted
reference run bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import netwatch
import numpy as np
import pytest
import ray_fixtures
import torch

from charlm import checkpoint, distributed, runs, storage
from charlm.config import TrainConfig
from charlm.data import StreamBatcher
from charlm.distributed import driver, worker
from charlm.model import CharLM
from charlm.vocab import Vocab

CFG = TrainConfig(
    num_layers=2,
    hidden_size=32,
    embed_size=16,
    dropout=0.1,
    seq_len=32,
    batch_size=4,
    max_steps=60,
    eval_every=10,
    log_every=5,
    eval_max_batches=4,
    precision="fp32",
    lr=1e-2,
    warmup_steps=5,
    seed=7,
)
WORKERS = 2
CORPUS_CHARS = 12_000  # ~42 global batches per epoch: the runs cross an epoch boundary


def _tiny_checkpoint(step: int, val_loss: float) -> bytes:
    vocab = Vocab.from_text("abc \n")
    cfg = CFG.model_config(len(vocab))
    torch.manual_seed(step)
    ck = checkpoint.build(CharLM(cfg), cfg, vocab, step=step, val_loss=val_loss, best_val_loss=val_loss)
    return checkpoint.to_bytes(ck)


def _weights(url: str) -> dict[str, torch.Tensor]:
    ck, _ = runs.load_checkpoint(url)
    return ck["state_dict"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max().item():.3g})"


# -- fast: names, folders, checkpoint lookup (no Ray started) -------------------------------------------
def test_run_name_is_a_function_of_the_parameters():
    a = distributed.derive_run_name(CFG, "ab12cd34" * 8, 2)
    assert a == distributed.derive_run_name(CFG.replace(), "ab12cd34" * 8, 2)
    assert a.startswith("charlm-ab12cd34-w2-")
    others = {
        distributed.derive_run_name(CFG.replace(lr=1e-3), "ab12cd34" * 8, 2),
        distributed.derive_run_name(CFG.replace(max_steps=61), "ab12cd34" * 8, 2),
        distributed.derive_run_name(CFG, "ff12cd34" * 8, 2),
        distributed.derive_run_name(CFG, "ab12cd34" * 8, 3),
    }
    assert a not in others and len(others) == 4
    assert distributed.check_run_name(a) == a


@pytest.mark.parametrize("bad", ["", "-x", "a/b", "a b", "x" * 101, "../up"])
def test_bad_run_names_are_refused(bad):
    with pytest.raises(ValueError, match="run name"):
        distributed.check_run_name(bad)


def test_rank_view_gives_each_rank_its_rows_of_the_all_streams_carry():
    h = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    ck = {"step": 5, "carry": [h, -h]}
    for rank in (0, 1):
        got = worker._rank_view(ck, rank, 2, 4)
        assert torch.equal(got["carry"][0], h[:, rank * 4 : (rank + 1) * 4])
        assert torch.equal(got["carry"][1], -h[:, rank * 4 : (rank + 1) * 4])
    assert ck["carry"][0].shape[1] == 8  # the loaded checkpoint itself is untouched
    assert worker._rank_view(ck, 0, 1, 8) is ck
    assert worker._rank_view({"carry": None}, 1, 2, 4)["carry"] is None


def test_limits_reached_detects_a_finished_checkpoint():
    ck = {"step": 60, "epoch": 1, "batch_in_epoch": 18, "train_seconds": 3.0}
    assert worker._limits_reached(CFG, ck, 42)
    assert not worker._limits_reached(CFG, {**ck, "step": 59}, 42)
    by_epoch = TrainConfig(max_epochs=1.5)
    assert not worker._limits_reached(by_epoch, ck, 42)
    assert worker._limits_reached(by_epoch, {**ck, "batch_in_epoch": 21}, 42)
    assert worker._limits_reached(TrainConfig(time_budget=0.05), ck, 42)


def test_a_failed_run_is_explained_by_its_first_cause():
    died = RuntimeError(
        "A worker health check failed.\nThe actor is dead because its worker process has died. Worker exit "
        "type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2. "
        "End of file. Some common causes..."
    )
    peer = RuntimeError("[gloo/pair.cc:537] Read error: Connection reset by peer. A remote worker crashed")
    explain = driver._explain_worker_failures
    assert explain({0: peer, 1: died}) == (
        "worker rank 1 died (Worker unexpectedly exits with a connection error code 2)"
    )
    own = ValueError("training diverged at step 3\ntraceback...")
    assert explain({0: peer, 1: died, 2: own}) == "worker rank 2: ValueError: training diverged at step 3"
    assert explain({1: peer}).startswith("worker rank 1: RuntimeError: [gloo/pair.cc:537] Read error")


def test_find_checkpoint_in_a_run_folder(tmp_path):
    run = tmp_path / "runs" / "run"
    for step, loss in ((10, 1.5), (20, 1.9)):
        (run / f"checkpoint_{step:09d}").mkdir(parents=True)
        (run / f"checkpoint_{step:09d}" / "checkpoint.pt").write_bytes(_tiny_checkpoint(step, loss))
    # no snapshot: the newest checkpoint folder, whichever is asked
    assert runs.find_checkpoint(str(run)).endswith("checkpoint_000000020/checkpoint.pt")
    snapshot = {
        "checkpoint_results": [
            {"checkpoint_dir_name": f"checkpoint_{s:09d}", "metrics": {"step": s, "val_loss": v}}
            for s, v in ((10, 1.5), (20, 1.9))
        ],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000000020", "metrics": {}},
    }
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert runs.find_checkpoint(str(run)).endswith("checkpoint_000000010/checkpoint.pt")
    assert runs.find_checkpoint(str(run), "last").endswith("checkpoint_000000020/checkpoint.pt")
    ck, url = runs.load_checkpoint(str(run))
    assert ck["step"] == 10 and url.endswith("checkpoint_000000010/checkpoint.pt")
    (run / "best.pt").write_bytes(_tiny_checkpoint(20, 1.9))
    assert runs.find_checkpoint(str(run)) == str(run / "best.pt")
    assert runs.find_checkpoint(str(run), "last") == str(run / "best.pt")  # no last.pt: the other one
    assert runs.find_checkpoint(str(run / "best.pt")) == str(run / "best.pt")
    with pytest.raises(runs.RunError, match="missing: no such checkpoint file, run folder or run name"):
        runs.find_checkpoint(str(tmp_path / "missing"))
    # a bare run name is looked up in <store>/runs/
    assert runs.find_checkpoint("run", store=str(tmp_path)) == str(run / "best.pt")
    with pytest.raises(runs.RunError, match=r"^nope: no such"):
        runs.find_checkpoint("nope", store=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(runs.RunError, match=r"empty: holds no best.pt, last.pt or checkpoint_"):
        runs.find_checkpoint(str(tmp_path / "empty"))


def test_explicit_run_names_never_pick_up_another_run(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(ray_fixtures.make_corpus(CORPUS_CHARS))
    store = str(tmp_path / "store")
    spec, _ = distributed.resolve_data(str(corpus), CFG, store)
    url = distributed.run_url("mine", store)
    storage.write_text_atomic(
        storage.join(url, runs.RUN_FILE),
        json.dumps(driver._run_record(CFG, spec, str(corpus), "mine", WORKERS)),
    )
    with pytest.raises(distributed.RunExistsError, match=r"mine: run mine already exists; pass --resume-run"):
        distributed.train_distributed(CFG, str(corpus), store=store, workers=WORKERS, run_name="mine")
    with pytest.raises(distributed.RunExistsError, match=r"other parameters \(lr 0.01 -> 0.001\)"):
        distributed.train_distributed(
            CFG.replace(lr=1e-3), str(corpus), store=store, workers=WORKERS, run_name="mine", resume=True
        )
    with pytest.raises(distributed.RunExistsError, match=r"workers 2 -> 3"):
        distributed.train_distributed(CFG, str(corpus), store=store, workers=3, run_name="mine", resume=True)
    with pytest.raises(distributed.RunNotFoundError, match=r"theirs: no such run to resume"):
        distributed.train_distributed(
            CFG, str(corpus), store=store, workers=WORKERS, run_name="theirs", resume=True
        )
    os.makedirs(os.path.join(store, "runs", "stray", "x"))
    with pytest.raises(distributed.RunExistsError, match=r"stray: folder exists but is not a charlm run"):
        distributed.train_distributed(CFG, str(corpus), store=store, workers=WORKERS, run_name="stray")
    # a finished run is returned as it is, never trained again
    storage.write_text_atomic(storage.join(url, runs.SUMMARY_FILE), json.dumps({"run_name": "mine"}))
    done = distributed.train_distributed(
        CFG, str(corpus), store=store, workers=WORKERS, run_name="mine", resume=True
    )
    assert done == {"run_name": "mine", "already_finished": True}


# -- slow: real Ray runs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def listening():
    """Every TCP socket that starts listening while the module's Ray runs (Linux /proc), or None
    where there is no /proc/net/tcp to read: only the loopback test needs it, so only that test
    is skipped then, never the Ray runs that start after (and so inside) the watch."""
    if not netwatch.available():
        yield None
        return
    with netwatch.Watcher() as w:
        yield w


@pytest.fixture(scope="module")
def ray_cluster(s3_server, listening):
    """One local Ray (2 CPUs) for the module, started after the S3 variables are set."""
    ray = pytest.importorskip("ray")

    tmp = tempfile.mkdtemp(prefix="crt-")  # short: Ray's socket paths live below it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.delenv("RAY_ADDRESS", raising=False)
        distributed.ensure_ray(num_cpus=2)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_dataset(s3_server, tmp_path_factory):
    """(store, dataset id): the test corpus ingested into a store in a fresh S3 bucket."""
    import boto3

    from charlm import ingest

    bucket = f"runs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=bucket)
    store = f"s3://{bucket}/store"
    src = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    src.write_text(ray_fixtures.make_corpus(CORPUS_CHARS))
    return store, ingest.ingest([str(src)], store)["id"]


@pytest.fixture(scope="module")
def reference(ray_cluster, s3_dataset, tmp_path_factory):
    """The uninterrupted 2-worker run, every training batch of each rank recorded."""
    store, did = s3_dataset
    rec = tmp_path_factory.mktemp("batches")
    summary = distributed.train_distributed(
        CFG,
        did,
        store=store,
        workers=WORKERS,
        run_name="reference",
        collective_timeout_s=30,
        rank_callbacks=ray_fixtures.record_batches(str(rec)),
    )
    return summary, rec


@pytest.mark.slow
def test_two_gloo_workers_train_on_disjoint_streams_with_checkpoints_in_s3(reference, s3_dataset):
    from charlm import datasets
    from charlm.sample import Sampler

    summary, rec = reference
    store, did = s3_dataset
    url = f"{store}/runs/reference"
    assert summary["run_url"] == url and summary["dataset_id"] == did
    assert (summary["workers"], summary["world_size"], summary["backend"]) == (2, 2, "gloo")
    assert summary["steps"] == 60 and summary["restarts"] == 0 and summary["resumed_from_step"] is None
    # the loss goes down
    evals = summary["evals"]
    assert [e["step"] for e in evals] == [10, 20, 30, 40, 50, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 0.3
    # what every evaluation reports to Ray
    last = summary["last_report"]
    for key in ("train_loss", "val_loss", "val_bpc", "lr", "chars_per_s", "chars_per_s_total"):
        assert isinstance(last[key], float) and math.isfinite(last[key]), key
    assert len(last["workers_chars_per_s"]) == 2 and min(last["workers_chars_per_s"]) > 0

    # rank r trained on rows [4r, 4r+4) of the one-process layout with 8 streams, batch after batch
    train_ids = datasets.open_dataset(did, store).splits["train"]
    single = StreamBatcher(train_ids, 8, CFG.seq_len, seed=CFG.seed)
    expected = []
    for epoch in (0, 1):
        expected.extend(x.numpy() for x, _ in single.epoch(epoch))
    seen = [np.load(rec / f"rank{r}.npy") for r in (0, 1)]
    assert seen[0].shape == seen[1].shape == (60, 4, CFG.seq_len)
    for step in range(60):
        assert np.array_equal(seen[0][step], expected[step][:4])
        assert np.array_equal(seen[1][step], expected[step][4:])

    # Ray's checkpoints and the published files are in the S3 store
    names = {storage.basename(u) for u in storage.ls(url)}
    assert {"run.json", "best.pt", "last.pt", "summary.json", "checkpoint_manager_snapshot.json"} <= names
    kept = sorted(n for n in names if n.startswith("checkpoint_0"))
    assert "checkpoint_000000060" in kept and 1 <= len(kept) <= 2
    assert runs.find_checkpoint(url) == f"{url}/best.pt"
    last_ck, _ = runs.load_checkpoint(url, "last")
    best_ck, _ = runs.load_checkpoint(url, "best")
    assert last_ck["step"] == 60 and best_ck["val_loss"] == min(e["val_loss"] for e in evals)
    assert last_ck["carry"][0].shape == (CFG.num_layers, 8, CFG.hidden_size)  # all 8 streams
    model, vocab, _ = checkpoint.load_model(best_ck)
    text = Sampler(model, vocab).generate(["The "], 40, seed=1)[0]
    assert len(text) == 40
    assert json.loads(storage.read_bytes(f"{url}/summary.json"))["best_checkpoint"] == f"{url}/best.pt"


@pytest.mark.slow
def test_local_ray_and_the_ddp_rendezvous_listen_on_loopback_only(reference, listening):
    if listening is None:
        pytest.skip("no /proc/net/tcp on this machine")
    # GCS, raylet, workers and rank 0's TCPStore all started during the reference run
    assert len(listening.loopback_seen) >= 5, listening.loopback_seen
    assert listening.exposed() == []


@pytest.mark.slow
def test_a_worker_killed_once_resumes_from_the_last_checkpoint_exactly(reference, s3_dataset, tmp_path):
    store, did = s3_dataset
    marker = tmp_path / "died"
    summary = distributed.train_distributed(
        CFG,
        did,
        store=store,
        workers=WORKERS,
        run_name="killed-once",
        max_failures=1,
        collective_timeout_s=30,
        rank_callbacks=ray_fixtures.die_once(str(marker), rank=1, step=45),
    )
    assert marker.exists()  # rank 1 did kill itself after step 45
    assert summary["steps"] == 60 and summary["restarts"] == 1
    assert [a["resumed_from_step"] for a in summary["attempts"]] == [None, 40]
    assert [e["step"] for e in summary["evals"]] == [50, 60]  # steps 41-45 were redone, not 1-45
    # DDP with gloo on CPU is deterministic here: the final model is bit-equal to the uninterrupted one
    ref = reference[0]
    _assert_same_weights(_weights(summary["last_checkpoint"]), _weights(ref["last_checkpoint"]))
    assert summary["val_loss"] == ref["val_loss"]


@pytest.mark.slow
def test_no_restarts_allowed_fails_the_flow_and_publishes_nothing(
    ray_cluster, s3_dataset, prefect_harness, tmp_path
):
    from flows.train import train_model

    store, did = s3_dataset
    state = train_model(
        did,
        CFG.to_dict(),
        {"workers": WORKERS, "max_failures": 0, "collective_timeout_s": 30},
        store,
        "no-restarts",
        rank_callbacks=ray_fixtures.die_once(str(tmp_path / "died"), rank=1, step=25),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(distributed.DistributedTrainingError) as e:
        state.result()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("run no-restarts failed (no restarts allowed): worker rank 1 died (")
    assert "run the same command again" in msg
    url = f"{store}/runs/no-restarts"
    names = {storage.basename(u) for u in storage.ls(url)}
    assert not names & {"best.pt", "last.pt", "summary.json"}
    assert "checkpoint_000000020" in names  # what was done is kept for a resume


@pytest.mark.slow
def test_a_killed_driver_is_resumed_by_running_the_same_command_again(
    reference, s3_dataset, prefect_harness, tmp_path
):
    from flows.train import train_model

    store, did = s3_dataset
    name = distributed.derive_run_name(CFG, did, WORKERS)
    url = f"{store}/runs/{name}"
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import ray_fixtures\n"
        "from charlm.config import TrainConfig\n"
        "from charlm.distributed import train_distributed\n"
        "train_distributed(TrainConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], store=sys.argv[3],\n"
        "                  workers=2, rank_callbacks=ray_fixtures.slow_steps(0.15))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="crd-")
    driver = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(CFG.to_dict()), did, store],
        env=env,
        start_new_session=True,  # the driver and the local Ray it starts: killed together below
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            entries = runs._snapshot_entries(url) or []
            if any((e["step"] or 0) >= 20 for e in entries):
                break
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        else:
            pytest.fail("the driver reported no checkpoint at step 20 within 120 s")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert not storage.exists(f"{url}/summary.json")

    out = train_model(did, CFG.to_dict(), {"workers": WORKERS, "collective_timeout_s": 30}, store)
    assert out["run_name"] == name and out["run_url"] == url
    assert out["best_checkpoint"] == f"{url}/best.pt" and out["steps"] == 60
    assert out["resumed_from_step"] >= 20 and out["restarts"] == 0
    assert set(out) == set(__import__("flows.train", fromlist=["RESULT_KEYS"]).RESULT_KEYS)
    summary = json.loads(storage.read_bytes(f"{url}/summary.json"))
    assert summary["driver_sessions"] == 2 and summary["attempts"][0]["resumed_from_step"] is None
    _assert_same_weights(_weights(out["last_checkpoint"]), _weights(reference[0]["last_checkpoint"]))
    # the same command once more: the finished run is returned, not trained again
    again = train_model(did, CFG.to_dict(), {"workers": WORKERS}, store)
    assert again["already_finished"] is True and again["run_url"] == url


@pytest.mark.slow
def test_one_worker_gives_the_same_model_as_plain_local_training(ray_cluster, tmp_path):
    from charlm.cli import run_local_training

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(ray_fixtures.make_corpus(CORPUS_CHARS))
    cfg = CFG.replace(batch_size=8, max_steps=30)
    summary = distributed.train_distributed(
        cfg, str(corpus), store=str(tmp_path / "store"), workers=1, cpus_per_worker=2
    )
    assert summary["world_size"] == 1 and summary["steps"] == 30
    torch.set_num_threads(2)
    local = run_local_training(cfg, str(corpus), tmp_path / "local", resume=False, quiet=True, device="cpu")
    _assert_same_weights(_weights(summary["last_checkpoint"]), _weights(local["last_checkpoint"]))
    assert summary["best_val_loss"] == local["best_val_loss"]


@pytest.mark.slow
def test_generation_on_two_ray_actors_equals_one_process(ray_cluster, s3_bucket):
    from charlm import checkpoint, storage
    from charlm.config import ModelConfig
    from charlm.generate import GenerateConfig
    from charlm.genjob import read_records, run_job
    from charlm.model import CharLM
    from charlm.vocab import Vocab

    vocab = Vocab.from_text(ray_fixtures.make_corpus(2000))
    torch.manual_seed(1)
    model = CharLM(ModelConfig(len(vocab), "lstm", 2, 32, 8, 0.0))
    ck = checkpoint.to_bytes(checkpoint.build(model, model.config, vocab))
    prompts = f"{s3_bucket}/prompts.jsonl"
    storage.write_text_atomic(
        prompts, '{"prompt": "The quick"}\n{"prompt": "Pack my box"}\n{"prompt": "ZZZ"}\n"A lazy"\n'
    )
    cfg = GenerateConfig(num_samples=3, length=30, seed=7, batch_size=4)
    seen: list[tuple[int, int]] = []
    two = run_job(
        ck,
        "tiny",
        prompts,
        f"{s3_bucket}/out2",
        cfg,
        workers=2,
        executor=distributed.generate_on_ray,
        progress=lambda d, n: seen.append((d, n)),
    )
    one = run_job(ck, "tiny", prompts, f"{s3_bucket}/out1", cfg, workers=1)
    assert two["workers"] == 2 and two["records"] == one["records"] == 12 and two["errors"] == 3
    assert seen[-1] == (9, 12)
    assert read_records(f"{s3_bucket}/out2") == read_records(f"{s3_bucket}/out1")
    assert storage.exists(f"{s3_bucket}/out2/part-00001.jsonl")
