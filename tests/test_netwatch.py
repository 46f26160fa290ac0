"""The listening-socket watcher the loopback tests rely on: it must see what it claims to catch."""

from __future__ import annotations

import ipaddress
import socket
import time

import netwatch
import pytest

pytestmark = pytest.mark.skipif(not netwatch.available(), reason="no /proc/net/tcp on this machine")


def _wait_polls(w: netwatch.Watcher, n: int = 3) -> None:
    start = w.polls
    deadline = time.monotonic() + 10
    while w.polls < start + n and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_socket_on_all_interfaces_is_reported_with_its_owner_and_loopback_is_not():
    with (
        netwatch.Watcher(interval=0.02) as w,
        socket.create_server(("127.0.0.1", 0)) as lo,
        socket.create_server(("0.0.0.0", 0)) as anyv4,
    ):
        ports = lo.getsockname()[1], anyv4.getsockname()[1]
        _wait_polls(w)
    assert ("127.0.0.1", ports[0]) in w.loopback_seen
    exposed = w.exposed()
    assert len(exposed) == 1 and exposed[0].startswith(f"0.0.0.0:{ports[1]} (pid ")


def test_ipv6_addresses_decode_from_proc():
    assert ipaddress.ip_address(netwatch._decode("0000000000000000FFFF00000100007F")) == ipaddress.ip_address(
        "::ffff:127.0.0.1"
    )
    assert netwatch._decode("00000000000000000000000001000000") == "::1"
    assert netwatch._decode("0100007F") == "127.0.0.1"
    assert netwatch.Listener("::ffff:127.0.0.1", 1, 0).loopback
    assert not netwatch.Listener("::", 1, 0).loopback
