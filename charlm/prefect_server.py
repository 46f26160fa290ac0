"""Where the flows' Prefect API lives when PREFECT_API_URL is not set.

Prefect's own answer is a temporary server per command: ~10 s and ~290 MB each time, and on a
loaded machine its 20 s start-up timeout failed commands outright (`Timed out while attempting to
connect to ephemeral Prefect API server`). charlm instead starts one local server per Prefect home
(PREFECT_HOME, default ~/.prefect) on first need, bound to 127.0.0.1 with its UI (so the flow-run
links Prefect prints open), and every later command reuses it: a command then pays ~1 s of Prefect
overhead. It is started under a file lock (commands starting together start one server), waited
for up to CHARLM_PREFECT_START_TIMEOUT seconds (default 120), stops itself after
CHARLM_PREFECT_IDLE_MINUTES (default 60) without a command or a running flow, and
`charlm server stop` stops it now. CHARLM_PREFECT_SERVER=ephemeral keeps Prefect's temporary
server per command (with the longer start-up timeout).

State: <PREFECT_HOME>/charlm-server.json (pid, port, url), a .lock beside it, and the server's
log in charlm-server.log. The server's database is Prefect's own, in PREFECT_HOME.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

START_TIMEOUT_ENV = "CHARLM_PREFECT_START_TIMEOUT"
IDLE_ENV = "CHARLM_PREFECT_IDLE_MINUTES"
MODE_ENV = "CHARLM_PREFECT_SERVER"
DEFAULT_START_TIMEOUT = 120.0
DEFAULT_IDLE_MINUTES = 60.0


class PrefectServerError(RuntimeError):
    """The local Prefect server could not be started or reached; one line saying why and where."""


def home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def _state_file() -> Path:
    return home() / "charlm-server.json"


def _read_state() -> dict[str, Any] | None:
    try:
        return json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _touch() -> None:
    with contextlib.suppress(OSError):
        os.utime(_state_file())


def _running(state: dict[str, Any] | None) -> str | None:
    """The API URL of the server `state` describes if it is up and answering, else None."""
    if not state or not _alive(int(state.get("pid", -1))):
        return None
    url = str(state.get("url", ""))
    return url if url and _healthy(url) else None


def _start_timeout() -> float:
    raw = os.environ.get(START_TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_START_TIMEOUT
    except ValueError:
        raise PrefectServerError(f"{START_TIMEOUT_ENV}={raw!r}: not a number of seconds") from None
    if value <= 0:
        raise PrefectServerError(f"{START_TIMEOUT_ENV}={raw!r}: must be positive")
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _locked():
    lock = home() / "charlm-server.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _spawn(timeout: float) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home() / "charlm-server.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "charlm.prefect_server", "serve", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives this command; Ctrl-C here does not reach it
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise PrefectServerError(
                f"local Prefect server on 127.0.0.1:{port} exited with {proc.returncode} while "
                f"starting ({tail[0][:200]}); log: {log}"
            )
        if _healthy(url, timeout=1.0):
            state = {"pid": proc.pid, "port": port, "url": url, "started": time.time()}
            tmp = _state_file().with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(_state_file())
            return state
        time.sleep(0.25)
    _terminate(proc.pid)
    raise PrefectServerError(
        f"local Prefect server on 127.0.0.1:{port} did not answer within {timeout:g} s "
        f"(set {START_TIMEOUT_ENV} to wait longer, or PREFECT_API_URL to use a running server); log: {log}"
    )


def ensure() -> str | None:
    """Point this process (PREFECT_API_URL) at a Prefect API before any flow runs, starting the
    local server if none is up. Returns the URL, or None when Prefect's temporary server is asked
    for (CHARLM_PREFECT_SERVER=ephemeral). A PREFECT_API_URL already set is left as it is."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    timeout = _start_timeout()  # a bad setting is refused wherever the server would come from
    if "prefect" in sys.modules:  # e.g. inside prefect_test_harness: its server is the one to use
        from prefect.settings import get_current_settings

        current = get_current_settings().api.url
        if current:
            return str(current)
    if os.environ.get(MODE_ENV, "").lower() == "ephemeral":
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(int(timeout)))
        return None
    url = _running(_read_state())
    if url is None:
        with _locked():  # one start, however many commands arrive together
            state = _read_state()
            url = _running(state)
            if url is None:
                if state and _alive(int(state.get("pid", -1))):
                    _terminate(int(state["pid"]))  # alive but not answering: replace it
                url = _spawn(timeout)["url"]
    _touch()
    os.environ["PREFECT_API_URL"] = url
    return url


def status() -> dict[str, Any]:
    """{running, url, pid, port, home, idle_s}."""
    state = _read_state()
    url = _running(state)
    out: dict[str, Any] = {"running": url is not None, "home": str(home()), "url": url}
    if state:
        out.update(pid=state.get("pid"), port=state.get("port"))
        with contextlib.suppress(OSError):
            out["idle_s"] = round(time.time() - _state_file().stat().st_mtime, 1)
    return out


def _terminate(pid: int, wait: float = 15.0) -> bool:
    """SIGTERM the server's process group, SIGKILL after `wait` s; True if it was running."""
    if not _alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _alive(pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return True


def stop() -> dict[str, Any]:
    """Stop the local server of this Prefect home, if one runs; {stopped, pid, url}."""
    with _locked():
        state = _read_state()
        stopped = bool(state) and _terminate(int(state.get("pid", -1)))  # type: ignore[union-attr]
        with contextlib.suppress(FileNotFoundError):
            _state_file().unlink()
    return {"stopped": stopped, "pid": (state or {}).get("pid"), "url": (state or {}).get("url")}


# -- the server process ---------------------------------------------------------------------------
def _busy(url: str) -> bool:
    """Whether any flow run is pending or running (an idle server must not stop under one)."""
    body = json.dumps({"flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING", "CANCELLING"]}}}})
    req = urllib.request.Request(
        f"{url}/flow_runs/count", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(json.loads(r.read())) > 0
    except (OSError, ValueError):
        return True  # cannot tell: keep serving


def serve(port: int) -> int:
    """Run `prefect server start` on 127.0.0.1:port until stopped, or until idle (no command
    touched the state file and no flow run is active) for CHARLM_PREFECT_IDLE_MINUTES."""
    idle_s = float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE_MINUTES) * 60
    child = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdin=subprocess.DEVNULL,
    )

    def on_term(signum: int, frame: Any) -> None:
        child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    url = f"http://127.0.0.1:{port}/api"
    started = time.time()
    while child.poll() is None:
        time.sleep(min(30.0, max(1.0, idle_s / 10)))
        try:
            last = _state_file().stat().st_mtime
        except OSError:
            # Not recorded yet (starting), or gone: stop() removed it or its Prefect home was
            # deleted. Past the start-up time, nothing can find this server any more: stop.
            last = started if time.time() - started < DEFAULT_START_TIMEOUT + 60 else 0.0
        if time.time() - last > idle_s and not _busy(url):
            child.terminate()
            with contextlib.suppress(FileNotFoundError):
                if (_read_state() or {}).get("pid") == os.getpid():
                    _state_file().unlink()
            break
    try:
        return child.wait(30)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        sys.exit(serve(int(sys.argv[2])))
    print("usage: python -m charlm.prefect_server serve PORT", file=sys.stderr)
    sys.exit(2)
