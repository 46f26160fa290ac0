"""A real multi-node Ray cluster on this machine (infra/ray-cluster.sh): joining it, failing fast on
an address that does not answer, and a training that loses a node mid-run.

The fast tests check RAY_ADDRESS handling without starting Ray. The slow ones start a head and two
worker nodes (1 CPU each, loopback only, their own ports and temp dirs) once for the module, and
stop them by process group at the end.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import netwatch
import pytest
import ray_fixtures

from charlm import runs, storage
from charlm.config import TrainConfig
from charlm.distributed import DistributedTrainingError, node, probe

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "infra" / "ray-cluster.sh"
CFG = TrainConfig(
    num_layers=1,
    hidden_size=32,
    embed_size=16,
    dropout=0.0,
    seq_len=32,
    batch_size=4,
    max_steps=40,
    eval_every=10,
    log_every=10,
    eval_max_batches=2,
    precision="fp32",
    lr=1e-2,
    warmup_steps=2,
    seed=3,
)


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- fast: addresses and the checks before joining (no Ray started) -------------------------------------
@pytest.mark.parametrize(
    ("address", "parts", "loopback"),
    [
        ("127.0.0.1:6379", ("", "127.0.0.1", 6379), True),
        ("ray://127.0.0.1:10001", ("ray", "127.0.0.1", 10001), True),
        ("http://localhost:8265", ("http", "localhost", 8265), True),
        ("[::1]:6379", ("", "::1", 6379), True),
        ("10.1.2.3:6379", ("", "10.1.2.3", 6379), False),
        ("ray://head:10001", ("ray", "head", 10001), False),
        ("auto", ("", "auto", None), False),
    ],
)
def test_ray_addresses_are_read_in_every_form(address, parts, loopback):
    assert probe.split_address(address) == parts
    assert probe.is_loopback_address(address) is loopback


def test_the_node_launcher_knows_which_nodes_go_on_loopback():
    assert node._loopback_target(["--head", "--node-ip-address=127.0.0.1", "--port=1"])
    assert node._loopback_target(["--head", "--node-ip-address", "127.0.0.1"])
    assert not node._loopback_target(["--head", "--port=1"])
    assert node._loopback_target(["--address=127.0.0.1:6379", "--num-cpus=1"])
    assert node._loopback_target(["--address", "localhost:6379"])
    assert not node._loopback_target(["--address=10.0.0.2:6379"])


def test_a_closed_port_and_a_dashboard_url_are_refused_at_once():
    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(DistributedTrainingError) as e:
        probe.check_cluster(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 2
    assert str(e.value) == (
        f"RAY_ADDRESS=127.0.0.1:{port}: nothing listens on 127.0.0.1:{port} (connection refused): "
        "is the Ray head running, and is this its port?"
    )
    with pytest.raises(
        DistributedTrainingError, match=r"RAY_ADDRESS=ray://127\.0\.0\.1:\d+: nothing listens"
    ):
        probe.check_cluster(f"ray://127.0.0.1:{port}")
    with pytest.raises(DistributedTrainingError, match=r"^RAY_ADDRESS=http://h:8265 is a dashboard address"):
        probe.check_cluster("http://h:8265")
    with pytest.raises(DistributedTrainingError, match=r"nosuch\.invalid does not resolve"):
        probe.check_cluster("nosuch.invalid:6379")
    probe.check_cluster("auto")  # no port: left to Ray's own lookup


def test_a_port_that_accepts_but_is_no_gcs_fails_within_the_bound(monkeypatch):
    """A listener that accepts connections and never answers (a wrong port, a hung head)."""
    monkeypatch.setattr(probe, "GCS_TIMEOUT_S", 2.0)
    held = []
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        port = srv.getsockname()[1]

        def accept() -> None:
            try:
                while True:
                    held.append(srv.accept()[0])
            except OSError:
                return

        threading.Thread(target=accept, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(DistributedTrainingError) as e:
            probe.check_cluster(f"127.0.0.1:{port}")
        elapsed = time.monotonic() - t0
    for c in held:
        c.close()
    assert elapsed < 6, elapsed
    assert str(e.value).startswith(
        f"RAY_ADDRESS=127.0.0.1:{port}: 127.0.0.1:{port} accepts connections but no Ray GCS answered within 2 s"
    )


def test_a_loopback_ray_address_is_joined_on_loopback_without_any_variable(monkeypatch):
    """Ray outside its local-only mode rewrites 127.0.0.1 in RAY_ADDRESS to the host's routable
    address, where a loopback-bound head never answers: ensure_ray switches that mode on itself."""
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants, services

    from charlm.distributed import session

    if ray.is_initialized():
        pytest.skip("Ray already runs in this process")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # Ray's default on Linux
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")

    def stop_before_init(address: str) -> None:
        raise DistributedTrainingError(f"checked {address}")

    monkeypatch.setattr(session, "check_cluster", stop_before_init)
    with pytest.raises(DistributedTrainingError, match=r"^checked 127\.0\.0\.1:6390$"):
        session.ensure_ray()
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert services.canonicalize_bootstrap_address("127.0.0.1:6390") == "127.0.0.1:6390"
    assert services.get_node_ip_address() == "127.0.0.1"


@pytest.mark.slow
def test_charlm_train_with_a_dead_ray_address_fails_in_one_line_within_30_s(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(ray_fixtures.make_corpus(4000))
    port = _closed_port()
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "CHARLM_STORE": str(tmp_path / "store")}
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "charlm.cli", "train", str(corpus), "--workers", "2", "--no-track"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert elapsed <= 30, elapsed
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"charlm: error: RAY_ADDRESS=127.0.0.1:{port}: nothing listens on"), (
        out.stderr
    )
    assert sum("charlm: error" in ln for ln in lines) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "store" / "runs").exists() or not any((tmp_path / "store" / "runs").iterdir())


# -- slow: a head and two worker nodes ------------------------------------------------------------------
class Cluster:
    def __init__(self, env: dict[str, str], directory: str) -> None:
        self.env, self.dir = env, directory
        self.address = f"127.0.0.1:{env['CHARLM_RAY_PORT']}"

    def script(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def pgids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in Path(self.dir).glob("*.pgid")}

    def nodes(self) -> list[dict]:
        out = subprocess.run(
            [sys.executable, "-m", "charlm.distributed.node", "nodes", self.address],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return [json.loads(ln) for ln in out.stdout.splitlines()]


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(pid))
    return pids


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def _raylet_of(node_id: str) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"/raylet") and f"--node_id={node_id}".encode() in cmd:
            return int(pid)
    raise AssertionError(f"no raylet process for node {node_id}")


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head and two worker nodes, 1 CPU each, started after the S3 variables are set (the nodes,
    and so the training workers, read the store's endpoint and credentials from their environment)."""
    directory = tempfile.mkdtemp(prefix="crc-")  # short: Ray's socket paths live below it
    base = random.randrange(20000, 32000 - 300, 100)
    env = {
        **os.environ,
        "CHARLM_RAY_DIR": directory,
        "CHARLM_RAY_PORT": str(_closed_port()),
        "CHARLM_RAY_DASHBOARD_PORT": str(_closed_port()),
        "CHARLM_RAY_CLIENT_PORT": str(_closed_port()),
        "CHARLM_RAY_PORT_BASE": str(base),
        "CHARLM_RAY_OBJECT_STORE_MB": "128",
        # the GCS marks a node dead within ~2 s of its raylet going silent (default ~25 s)
        "RAY_health_check_initial_delay_ms": "1000",
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_timeout_ms": "500",
        "RAY_health_check_failure_threshold": "3",
    }
    env.pop("RAY_ADDRESS", None)
    c = Cluster(env, directory)
    try:
        started = c.script("start", "2")
        assert started.returncode == 0, started.stderr[-3000:]
        assert f"export RAY_ADDRESS={c.address}" in started.stdout
        yield c
    finally:
        stopped = c.script("stop", timeout=120)
        for pgid in c.pgids().values():  # whatever stop left: never `ray stop`
            if _group_pids(pgid):
                os.killpg(pgid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr


@pytest.mark.slow
def test_the_cluster_has_three_nodes_each_listening_on_loopback_only(cluster):
    nodes = cluster.nodes()
    assert len(nodes) == 3 and sum(n["head"] for n in nodes) == 1
    assert {n["ip"] for n in nodes} == {"127.0.0.1"}
    groups = cluster.pgids()
    assert set(groups) == {"head", "node1", "node2"}
    inodes: set[int] = set()
    for pgid in groups.values():
        pids = _group_pids(pgid)
        assert pids, f"process group {pgid} is gone"
        for pid in pids:
            inodes |= _socket_inodes(pid)
    listening = [x for x in netwatch.listeners() if x.inode in inodes]
    ports = {x.port for x in listening}
    assert int(cluster.env["CHARLM_RAY_PORT"]) in ports  # GCS
    assert int(cluster.env["CHARLM_RAY_DASHBOARD_PORT"]) in ports
    assert int(cluster.env["CHARLM_RAY_CLIENT_PORT"]) in ports
    assert len(listening) >= 10
    assert [f"{x.address}:{x.port}" for x in listening if not x.loopback] == []
    status = cluster.script("status", timeout=60)
    assert status.returncode == 0 and status.stdout.count("running (process group") == 3


@pytest.mark.slow
def test_the_join_checks_pass_on_the_cluster_and_name_a_missing_local_node(cluster, monkeypatch):
    probe.check_cluster(cluster.address)
    probe.check_cluster(f"ray://127.0.0.1:{cluster.env['CHARLM_RAY_CLIENT_PORT']}")
    from ray._private import services

    monkeypatch.setattr(services, "find_node_ids", lambda: [])  # as on a machine outside the cluster
    with pytest.raises(DistributedTrainingError) as e:
        probe.check_cluster(cluster.address)
    msg = str(e.value)
    assert msg.startswith(
        f"RAY_ADDRESS={cluster.address}: the cluster answers, but none of its nodes (127.0.0.1:"
    )
    assert "runs on this machine; " in msg and "ray://HEAD:10001" in msg


@pytest.fixture(scope="module")
def s3_store(s3_server, tmp_path_factory):
    import boto3

    from charlm import ingest

    bucket = f"cluster-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=bucket)
    store = f"s3://{bucket}/store"
    src = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    src.write_text(ray_fixtures.make_corpus(12_000))
    return store, ingest.ingest([str(src)], store)["id"]


DRIVER = """
import json, sys
sys.path.insert(0, {tests!r})
import ray_fixtures
from charlm.config import TrainConfig
from charlm.distributed import train_distributed
out = train_distributed(TrainConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], store=sys.argv[3],
                        workers=2, max_failures=2, collective_timeout_s=30,
                        rank_callbacks=ray_fixtures.slow_steps(0.2))
with open(sys.argv[4], "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
def test_a_training_that_loses_a_worker_node_resumes_from_its_last_checkpoint(cluster, s3_store, tmp_path):
    """Two workers on two different nodes; the raylet of a worker node is SIGKILLed after the first
    checkpoint; the run restarts from that checkpoint on the remaining nodes and finishes with the
    right step count, every file in the store whole."""
    store, did = s3_store
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # charlm sets what a loopback cluster needs
    log = open(tmp_path / "driver.log", "wb")  # noqa: SIM115 - closed below
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DRIVER.format(tests=str(Path(__file__).parent)),
            json.dumps(CFG.to_dict()),
            did,
            store,
            str(tmp_path / "summary.json"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,  # a file: Ray's logs would fill a pipe nobody reads meanwhile
    )
    try:
        from charlm.distributed import derive_run_name

        name = derive_run_name(CFG, did, 2)
        url = f"{store}/runs/{name}"
        t0 = time.monotonic()
        deadline = t0 + 150
        while time.monotonic() < deadline:
            entries = runs._snapshot_entries(url) or []
            if any((e["step"] or 0) >= 10 for e in entries):
                break
            assert driver.poll() is None, _tail(tmp_path / "driver.log")
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint at step 10 within 150 s")
        first = runs.read_attempts(url)
        assert len(first) == 1 and len(first[0]["nodes"]) == 2
        on = first[0]["nodes"]
        assert on[0] != on[1], "the two workers share a node"
        head = next(n["node_id"] for n in cluster.nodes() if n["head"])
        victim = next(n for n in on if n != head)
        t_kill = time.monotonic()
        os.kill(_raylet_of(victim), signal.SIGKILL)
        driver.wait(timeout=240)
        print(
            f"first checkpoint after {t_kill - t0:.1f} s, done {time.monotonic() - t_kill:.1f} s after the kill"
        )
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        log.close()
    assert driver.returncode == 0, _tail(tmp_path / "driver.log")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == CFG.max_steps and summary["restarts"] >= 1
    attempts = summary["attempts"]
    assert attempts[0]["resumed_from_step"] is None
    assert attempts[1]["resumed_from_step"] in (10, 20, 30)  # from a checkpoint, not from scratch
    assert victim not in attempts[-1]["nodes"]  # the lost node hosts no worker after the restart
    assert len(set(attempts[-1]["nodes"])) == 2
    assert [e["step"] for e in summary["evals"]][-1] == CFG.max_steps
    # nothing in the store is lost or half-written
    names = {storage.basename(u) for u in storage.ls(url)}
    assert {"run.json", "best.pt", "last.pt", "summary.json", "attempts"} <= names
    assert not [n for n in names if ".tmp-" in n]
    for ck in sorted(n for n in names if n.startswith("checkpoint_0")):
        loaded, _ = runs.load_checkpoint(f"{url}/{ck}/{runs.CKPT_FILE}")
        assert loaded["step"] == int(ck.removeprefix("checkpoint_"))
    last, _ = runs.load_checkpoint(url, "last")
    assert last["step"] == CFG.max_steps
