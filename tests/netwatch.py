"""Which TCP sockets are listening on this machine, and on which address (Linux, from /proc).

The tests use it to prove that the embedded default (local Ray, the ephemeral Prefect server,
sqlite MLflow) never listens on anything but loopback while it runs.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path

_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    inode: int

    @property
    def loopback(self) -> bool:
        ip = ipaddress.ip_address(self.address)
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or bool(mapped and mapped.is_loopback)


def available() -> bool:
    return Path("/proc/net/tcp").exists()


def _decode(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    # /proc prints each 32-bit word of the address in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listeners() -> set[Listener]:
    found: set[Listener] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != _LISTEN:
                continue
            addr, port = cols[1].split(":")
            found.add(Listener(_decode(addr), int(port, 16), int(cols[9])))
    return found


def owner(inode: int) -> str:
    """The command line of the process holding a socket inode ('?' when not ours to see)."""
    needle = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        if any(_link(f"/proc/{pid}/fd/{fd}") == needle for fd in fds):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                cmd = b""
            return f"pid {pid}: {cmd.decode(errors='replace')[:160]}"
    return "?"


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile (listdir's own descriptor is one)
        return ""


class Watcher:
    """Polls the listening sockets in a thread; `exposed()` lists those that appeared while it
    ran on an address other than loopback (sockets that were there before it started are not
    counted: they belong to something else on the machine)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.before = {(x.address, x.port) for x in listeners()}
        self.seen: dict[tuple[str, int], str] = {}
        self.loopback_seen: set[tuple[str, int]] = set()
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for x in listeners():
                key = (x.address, x.port)
                if key in self.before:
                    continue
                if x.loopback:
                    self.loopback_seen.add(key)
                elif key not in self.seen:
                    self.seen[key] = owner(x.inode)
            self.polls += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def exposed(self) -> list[str]:
        return [f"{a}:{p} ({who})" for (a, p), who in sorted(self.seen.items())]
