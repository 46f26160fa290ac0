"""infra/local-stack.sh and infra/ports.py: the stack checks its ports before starting anything,
refuses one held by a process it did not start (naming the port and the pid), and `status` says
which pid serves each port. Listeners are real sockets; the slow test starts the real stack."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "infra" / "local-stack.sh"
SERVICES = ("s3", "mlflow", "prefect")

_spec = importlib.util.spec_from_file_location("charlm_infra_ports", REPO / "infra" / "ports.py")
ports = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ports  # dataclasses look their module up there
_spec.loader.exec_module(ports)

# a listener in a process of its own: prints its port, then waits to be killed
_LISTENER = """
import socket, sys, time
family = socket.AF_INET6 if sys.argv[1] == "::" else socket.AF_INET
s = socket.socket(family)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print(s.getsockname()[1], flush=True)
time.sleep(600)
"""


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 (held open together while chosen, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stack_env(stack_dir: Path, s3: int, mlflow: int, prefect: int, pg: int | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "CHARLM_STACK_DIR": str(stack_dir),
        "CHARLM_S3_PORT": str(s3),
        "CHARLM_MLFLOW_PORT": str(mlflow),
        "CHARLM_PREFECT_PORT": str(prefect),
        "CHARLM_BIN": str(Path(sys.executable).parent),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "DO_NOT_TRACK": "1",
    }
    if pg is not None:
        env["CHARLM_PG_PORT"] = str(pg)
    return env


def run_script(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def listener() -> Iterator:
    """listener(address="127.0.0.1", port=0, new_session=False) -> (Popen, port): a foreign server."""
    procs: list[subprocess.Popen] = []

    def start(address: str = "127.0.0.1", port: int = 0, new_session: bool = False):
        p = subprocess.Popen(
            [sys.executable, "-c", _LISTENER, address, str(port)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=new_session,
        )
        procs.append(p)
        return p, int(p.stdout.readline())

    yield start
    for p in procs:
        p.kill()
        p.wait(10)


def test_holders_names_the_listening_pid() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert ports.holders(port) == []  # bound, not listening: free for a server
        s.listen()
        assert ports.holders(port) == [ports.Holder("127.0.0.1", os.getpid())]
    assert ports.holders(port) == []


def test_holders_sees_dual_stack_and_wildcard_listeners(listener) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 sockets here")
    p, port = listener("::")  # a dual-stack listener takes 127.0.0.1:port too (from /proc/net/tcp6)
    assert ports.holders(port) == [ports.Holder("::", p.pid)]
    q, port4 = listener("0.0.0.0")
    assert ports.holders(port4) == [ports.Holder("0.0.0.0", q.pid)]


def test_belongs_to_follows_the_session_and_the_parents() -> None:
    # the leader's child, and an orphan of its session (its parent, a subshell, has exited)
    script = "sleep 60 & echo $!; (sleep 60 & echo $!); wait"
    leader = subprocess.Popen(
        ["bash", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    sibling = subprocess.Popen(["sleep", "60"])
    try:
        child, orphan = int(leader.stdout.readline()), int(leader.stdout.readline())
        assert ports.belongs_to(leader.pid, leader.pid)
        assert ports.belongs_to(child, leader.pid)  # in its session, and its child

        def under_leader() -> bool:  # the orphan's parent or grandparent is the leader
            parent = ports._stat(orphan)[0]
            return leader.pid in (parent, (ports._stat(parent) or (0, 0))[0])

        deadline = time.monotonic() + 10
        while under_leader() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not under_leader()  # reparented when the subshell exited: only the session ties it
        assert ports.belongs_to(orphan, leader.pid)
        assert ports.belongs_to(leader.pid, os.getpid())  # a descendant of this process
        assert not ports.belongs_to(os.getpid(), leader.pid)
        assert not ports.belongs_to(sibling.pid, leader.pid)
        assert not ports.belongs_to(1, leader.pid)
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        sibling.kill()
        leader.wait(10)
        sibling.wait(10)


@pytest.mark.parametrize("service,address", [("mlflow", "127.0.0.1"), ("s3", "0.0.0.0"), ("prefect", "::")])
def test_start_refuses_a_port_held_by_another_process(tmp_path, listener, service, address) -> None:
    if address == "::" and not socket.has_ipv6:
        pytest.skip("no IPv6 sockets here")
    foreign, port = listener(address)
    chosen = dict(zip(SERVICES, free_ports(3), strict=True))
    chosen[service] = port
    stack = tmp_path / "stack"
    t0 = time.monotonic()
    res = run_script(stack_env(stack, **chosen), "start")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr  # one line, naming the port, the service and the pid
    assert f"port {port} ({service})" in lines[0] and f"pid {foreign.pid} (" in lines[0], lines[0]
    assert f"CHARLM_{service.upper()}_PORT" in lines[0]
    assert res.stdout == ""  # no env printed: nothing to point at
    assert time.monotonic() - t0 < 20
    assert sorted(p.name for p in stack.iterdir()) == []  # no pid, log or database: nothing started
    for name, p in chosen.items():
        assert ports.holders(p) == ([ports.Holder(address, foreign.pid)] if name == service else [])
    assert foreign.poll() is None


def test_start_refuses_when_the_holder_pid_cannot_be_read(tmp_path, monkeypatch) -> None:
    """A listener /proc does not show (another namespace, another user's): still found by connect."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setattr(ports, "_listening_inodes", lambda port: {})
        (tmp_path / "stack").mkdir()
        out = ports.conflicts(tmp_path / "stack", "mlflow", port)
    assert out == [
        f"port {port} (mlflow) on 127.0.0.1 is held by a process whose pid this user cannot read, "
        "which this stack did not start; stop it or set CHARLM_MLFLOW_PORT to a free port"
    ]


def test_ports_of_the_stacks_own_servers_pass_and_status_names_each_pid(tmp_path, listener) -> None:
    """A server whose pid the stack folder records (with its children, in its session) is the
    stack's own: `start` goes on; one the stack did not start is named as such."""
    stack = tmp_path / "stack"
    stack.mkdir()
    own, own_port = listener(new_session=True)  # stands in for the stack's moto, as start_one records it
    (stack / "s3.pid").write_text(f"{own.pid}\n")
    (stack / "s3.port").write_text(f"{own_port}\n")
    foreign, foreign_port = listener()
    (free_port,) = free_ports(1)
    services = [f"s3={own_port}", f"mlflow={foreign_port}", f"prefect={free_port}"]
    py = [sys.executable, str(REPO / "infra" / "ports.py")]

    ok = subprocess.run([*py, "check", str(stack), services[0], services[2]], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    bad = subprocess.run([*py, "check", str(stack), *services], capture_output=True, text=True)
    assert bad.returncode == 1 and f"pid {foreign.pid} (" in bad.stderr and "(mlflow)" in bad.stderr

    st = subprocess.run([*py, "status", str(stack), *services], capture_output=True, text=True, check=True)
    lines = dict(line.split(": ", 1) for line in st.stdout.splitlines())
    assert lines["s3"].startswith(f"running (pid {own.pid}); 127.0.0.1:{own_port} served by pid {own.pid} (")
    assert lines["s3"].endswith(", this stack's")
    assert lines["mlflow"].startswith(f"stopped; 127.0.0.1:{foreign_port} served by pid {foreign.pid} (")
    assert lines["mlflow"].endswith("NOT this stack's")
    assert lines["prefect"] == f"stopped; 127.0.0.1:{free_port} free"

    # the stack's server asked for on another port than the one it runs on: refused, not waited for
    moved = subprocess.run([*py, "check", str(stack), f"s3={free_port}"], capture_output=True, text=True)
    assert moved.returncode == 1
    assert f"s3 of this stack is running on port {own_port} (pid {own.pid}), not {free_port}" in moved.stderr


@pytest.mark.slow
def test_stack_starts_again_on_its_own_ports_and_stops() -> None:
    """The real stack (sqlite): up, `status` names the pid serving each port as the stack's, a
    second `start` accepts its own servers, `stop` frees every port."""
    stack = Path(tempfile.mkdtemp(prefix="charlm-stack-"))
    chosen = dict(zip(SERVICES, free_ports(3), strict=True))
    env = stack_env(stack, **chosen)
    try:
        up = run_script(env, "start", timeout=240)
        assert up.returncode == 0, up.stderr[-3000:]
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{chosen['mlflow']}" in up.stdout
        st = run_script(env, "status")
        lines = dict(line.split(": ", 1) for line in st.stdout.splitlines())
        for name, port in chosen.items():
            pid = int((stack / f"{name}.pid").read_text())
            assert lines[name].startswith(f"running (pid {pid}); 127.0.0.1:{port} served by pid "), lines[
                name
            ]
            assert lines[name].endswith(", this stack's"), lines[name]
            (holder,) = ports.holders(port)
            assert ports.belongs_to(holder.pid, pid)
        again = run_script(env, "start", timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout == up.stdout
    finally:
        down = run_script(env, "stop", timeout=120)
    assert down.returncode == 0, down.stderr
    for name, port in chosen.items():
        assert ports.holders(port) == [], name
        assert not (stack / f"{name}.pid").exists()
    subprocess.run(["rm", "-rf", str(stack)], check=False)
