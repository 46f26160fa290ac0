"""Which process serves a loopback port, and whether it is one a stack folder started.

Used by infra/local-stack.sh (standard library only: it runs before anything is installed):

    python infra/ports.py check  STACK_DIR NAME=PORT ...   # exit 1, one line per port held by others
    python infra/ports.py status STACK_DIR NAME=PORT ...   # one line per service: its pid, its port's

A service NAME of the stack is the process whose pid STACK_DIR/NAME.pid records (started in a
session of its own) with its children; the port it was started on is in STACK_DIR/NAME.port.
Listeners are read from /proc/net/tcp and tcp6 (those that take 127.0.0.1:PORT: bound to it, to
0.0.0.0, ::, or IPv4-mapped loopback), their pids from /proc/<pid>/fd (socket inodes). Where
/proc lists none, a TCP connect to 127.0.0.1:PORT still finds a listener this user cannot see.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"
# addresses whose listener takes 127.0.0.1:PORT from a new server
BLOCKING = {"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"}
# the variable that sets a service's port, where it is not CHARLM_<NAME>_PORT
PORT_VARS = {"postgres": "CHARLM_PG_PORT"}


@dataclass(frozen=True)
class Holder:
    """A listener on the port: its address, and its pid when this user can read it."""

    address: str
    pid: int | None


def _address(hex_addr: str) -> str:
    if len(hex_addr) == 8:  # /proc writes the 32-bit words in host byte order
        return socket.inet_ntop(socket.AF_INET, struct.pack("=I", int(hex_addr, 16)))
    words = [struct.pack("=I", int(hex_addr[i : i + 8], 16)) for i in range(0, 32, 8)]
    return socket.inet_ntop(socket.AF_INET6, b"".join(words))


def _listening_inodes(port: int, proc: Path = Path("/proc")) -> dict[int, str]:
    """{socket inode: address} of the listeners that take 127.0.0.1:port."""
    out: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != LISTEN:
                continue
            addr, _, hex_port = f[1].partition(":")
            if int(hex_port, 16) != port:
                continue
            where = _address(addr)
            if where in BLOCKING:
                out[int(f[9])] = where
    return out


def _pids_by_inode(inodes: set[int], proc: Path = Path("/proc")) -> dict[int, int]:
    found: dict[int, int] = {}
    wanted = {f"socket:[{i}]": i for i in inodes}
    for entry in proc.iterdir():
        if not entry.name.isdigit() or len(found) == len(wanted):
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                inode = wanted.get(os.readlink(fd))
            except OSError:
                continue
            if inode is not None:
                found.setdefault(inode, int(entry.name))
    return found


def _connects(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def holders(port: int) -> list[Holder]:
    """The listeners that hold 127.0.0.1:port (empty when it is free)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return [Holder("127.0.0.1", None)] if _connects(port) else []
    pids = _pids_by_inode(set(inodes))
    return sorted({Holder(addr, pids.get(i)) for i, addr in inodes.items()}, key=lambda h: h.pid or 0)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[3])


def belongs_to(pid: int, root: int) -> bool:
    """Whether pid is root, in root's session (started by it with setsid) or descended from it."""
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root:
            return True
        st = _stat(pid)
        if st is None:
            return False
        if st[1] == root:
            return True
        pid, seen = st[0], seen + 1
    return False


def command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(
        os.path.basename(a.decode(errors="replace")) if i == 0 else a.decode(errors="replace")
        for i, a in enumerate(argv)
        if a
    )
    text = " ".join(text.split())  # one line, whatever the arguments hold
    return text if len(text) <= 60 else text[:57] + "..."


def _recorded(stack_dir: Path, name: str, suffix: str) -> int | None:
    try:
        return int((stack_dir / f"{name}.{suffix}").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def running_pid(stack_dir: Path, name: str) -> int | None:
    """The recorded pid of the stack's service name, when that process is alive."""
    pid = _recorded(stack_dir, name, "pid")
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return pid


def _who(h: Holder) -> str:
    return f"pid {h.pid} ({command(h.pid)})" if h.pid else "a process whose pid this user cannot read"


def conflicts(stack_dir: Path, name: str, port: int) -> list[str]:
    """Why the service name cannot have 127.0.0.1:port: one line per reason, none when it can."""
    pid = running_pid(stack_dir, name)
    had = _recorded(stack_dir, name, "port")
    if pid is not None and had is not None and had != port:
        return [
            f"{name} of this stack is running on port {had} (pid {pid}), not {port}: "
            f"stop the stack first to move it (state in {stack_dir})"
        ]
    out = []
    for h in holders(port):
        if pid is not None and h.pid is not None and belongs_to(h.pid, pid):
            continue
        out.append(
            f"port {port} ({name}) on 127.0.0.1 is held by {_who(h)}, which this stack did not start; "
            f"stop it or set {PORT_VARS.get(name, f'CHARLM_{name.upper()}_PORT')} to a free port"
        )
    return out


def status_line(stack_dir: Path, name: str, port: int) -> str:
    pid = running_pid(stack_dir, name)
    port = (_recorded(stack_dir, name, "port") if pid is not None else None) or port
    head = f"{name}: running (pid {pid})" if pid is not None else f"{name}: stopped"
    held = holders(port)
    if not held:
        return f"{head}; 127.0.0.1:{port} free"
    parts = []
    for h in held:
        mine = pid is not None and h.pid is not None and belongs_to(h.pid, pid)
        parts.append(
            f"{h.address}:{port} served by {_who(h)}" + (", this stack's" if mine else ", NOT this stack's")
        )
    return f"{head}; " + "; ".join(parts)


def _services(args: list[str]) -> list[tuple[str, int]]:
    out = []
    for a in args:
        name, _, port = a.partition("=")
        out.append((name, int(port)))
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("check", "status"):
        print("usage: ports.py check|status STACK_DIR NAME=PORT ...", file=sys.stderr)
        return 2
    stack_dir, services = Path(argv[1]), _services(argv[2:])
    if argv[0] == "status":
        for name, port in services:
            print(status_line(stack_dir, name, port))
        return 0
    lines = [line for name, port in services for line in conflicts(stack_dir, name, port)]
    for line in lines:
        print(f"local-stack: {line}", file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
