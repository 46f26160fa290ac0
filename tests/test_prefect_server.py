"""The local Prefect server charlm starts on first need (charlm.prefect_server): one per Prefect
home however many commands start together, reused, stopped on request or when idle, and a failed
flow's last stderr line is charlm's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from charlm import prefect_server

BIN = Path(sys.executable).parent
ENSURE = "from charlm import prefect_server as p; import json; print(json.dumps([p.ensure(), __import__('os').getpid()]))"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


def test_a_set_api_url_is_left_alone(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert prefect_server.ensure() == "http://127.0.0.1:9/api"
    assert not (tmp_path / "charlm-server.json").exists()  # nothing started


def test_bad_start_timeout_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(prefect_server.START_TIMEOUT_ENV, "soon")
    with pytest.raises(
        prefect_server.PrefectServerError, match="CHARLM_PREFECT_START_TIMEOUT='soon': not a number"
    ):
        prefect_server.ensure()


@pytest.mark.slow
def test_one_server_for_commands_starting_together_then_reused_and_stopped(tmp_path) -> None:
    home = tmp_path / "ph"
    env = _env(home)
    procs = [
        subprocess.Popen([sys.executable, "-c", ENSURE], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    try:
        urls = {json.loads(p.communicate(timeout=300)[0])[0] for p in procs}
        assert all(p.returncode == 0 for p in procs)
        assert len(urls) == 1  # one server, whichever command started it
        state = json.loads((home / "charlm-server.json").read_text())
        assert urls == {state["url"]} and state["url"].startswith("http://127.0.0.1:")
        # a later command reuses it, at once
        t0 = time.monotonic()
        again = subprocess.run(
            [sys.executable, "-c", ENSURE], env=env, capture_output=True, text=True, timeout=120
        )
        assert json.loads(again.stdout)[0] == state["url"] and time.monotonic() - t0 < 30
        st = subprocess.run(
            [str(BIN / "charlm"), "server", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(st.stdout)["running"] and json.loads(st.stdout)["pid"] == state["pid"]
    finally:
        stop = subprocess.run(
            [str(BIN / "charlm"), "server", "stop", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert json.loads(stop.stdout)["stopped"] and _gone(state["pid"], 20)
    assert not (home / "charlm-server.json").exists()


@pytest.mark.slow
def test_an_idle_server_stops_itself(tmp_path) -> None:
    home = tmp_path / "ph"
    env = _env(home, CHARLM_PREFECT_IDLE_MINUTES="0.05")  # 3 s
    try:
        out = subprocess.run(
            [sys.executable, "-c", ENSURE], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        pid = json.loads((home / "charlm-server.json").read_text())["pid"]
        assert _gone(pid, 90)
        assert not (home / "charlm-server.json").exists()
    finally:
        subprocess.run([str(BIN / "charlm"), "server", "stop"], env=env, capture_output=True, timeout=60)


@pytest.mark.slow
def test_a_failed_flow_ends_with_charlms_error_line(tmp_path) -> None:
    home = tmp_path / "ph"
    env = _env(home, CHARLM_STORE=str(tmp_path / "store"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.txt").write_bytes(b"ok\xffno")
    try:
        res = subprocess.run(
            [str(BIN / "charlm"), "ingest", str(tmp_path / "c")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        subprocess.run([str(BIN / "charlm"), "server", "stop"], env=env, capture_output=True, timeout=60)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("charlm: error: ") and "bad.txt: invalid UTF-8 at byte offset 2" in last, (
        res.stderr[-2000:]
    )
