"""`charlm server status|start|stop`: the local Prefect server charlm starts on first need when
PREFECT_API_URL is not set (charlm.prefect_server)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _status(a: argparse.Namespace) -> dict[str, Any]:
    from charlm import prefect_server

    st = prefect_server.status()
    if not a.json:
        if st["running"]:
            print(f"local Prefect server: {st['url']} (pid {st['pid']}, Prefect home {st['home']})")
        else:
            print(f"no local Prefect server for Prefect home {st['home']}")
    return st


def _start(a: argparse.Namespace) -> dict[str, Any]:
    import os

    from charlm import prefect_server

    if os.environ.get("PREFECT_API_URL"):
        print(
            f"PREFECT_API_URL is set ({os.environ['PREFECT_API_URL']}): commands use that server",
            file=sys.stderr,
        )
    prefect_server.ensure()
    return _status(a)


def _stop(a: argparse.Namespace) -> dict[str, Any]:
    from charlm import prefect_server

    r = prefect_server.stop()
    if not a.json:
        print(
            f"stopped the local Prefect server (pid {r['pid']})"
            if r["stopped"]
            else "no local Prefect server ran"
        )
    return r


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "server",
        help="the local Prefect server charlm starts on first need (status, start, stop)",
        description="Without PREFECT_API_URL, the first command that runs a flow starts one local Prefect "
        "server (127.0.0.1, with its UI) for this Prefect home, and later commands reuse it. It stops "
        "itself after CHARLM_PREFECT_IDLE_MINUTES (default 60) without use; `stop` stops it now.",
    )
    ps = p.add_subparsers(dest="server_command", metavar="{status,start,stop}")
    ps.required = True
    for name, fn, help_text in (
        ("status", _status, "is it running, where"),
        ("start", _start, "start it now (commands otherwise start it on first need)"),
        ("stop", _stop, "stop it"),
    ):
        c = ps.add_parser(name, help=help_text)
        c.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
        c.set_defaults(func=fn)
