"""A Ray cluster on one machine's loopback, for infra/ray-cluster.sh:

    python -m charlm.distributed.node start ARGS...   # `ray start ARGS...`, on loopback (below)
    python -m charlm.distributed.node nodes ADDRESS   # the live nodes, one JSON object a line

Ray 2.60 binds a node's GCS, raylet and agents to 127.0.0.1 only when the node's IP is loopback,
and it makes the IP loopback only in its local-only mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0):
otherwise `--node-ip-address=127.0.0.1` and a `--address` on 127.0.0.1 are both rewritten to the
host's routable address, where a loopback head does not listen. But `ray start --address` refuses
to add a worker node in local-only mode ("Multi-node Ray clusters are not supported on Windows and
OSX"). So for a loopback address this runs `ray start` in local-only mode (the node and every
process it starts bind 127.0.0.1) with only that one refusal lifted. Any other address is handed to
`ray start` unchanged.
"""

from __future__ import annotations

import json
import os
import sys
import types

from charlm.distributed.errors import DistributedTrainingError
from charlm.distributed.probe import is_loopback_address, live_nodes
from charlm.distributed.session import LOCAL_ONLY_ENV


def _loopback_target(argv: list[str]) -> bool:
    """Whether this `ray start` makes a node on loopback: a head with --node-ip-address on 127.0.0.1,
    or a worker node joining a head on 127.0.0.1."""
    values: dict[str, str] = {}
    for i, arg in enumerate(argv):
        for flag in ("--address", "--node-ip-address"):
            if arg == flag and i + 1 < len(argv):
                values[flag] = argv[i + 1]
            elif arg.startswith(flag + "="):
                values[flag] = arg.split("=", 1)[1]
    if "--head" in argv:
        return is_loopback_address(values.get("--node-ip-address", ""))
    return is_loopback_address(values.get("--address", ""))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["nodes"] and len(argv) == 2:
        nodes(argv[1])
    elif argv[:1] == ["start"]:
        start(argv[1:])
    else:
        sys.exit("usage: python -m charlm.distributed.node start RAY_START_ARGS... | nodes ADDRESS")


def nodes(address: str) -> None:
    """Print the cluster's live nodes (node_id, ip, port, head), one JSON object a line; exit 1 with
    one line on stderr when the cluster does not answer."""
    try:
        alive = live_nodes(address)
    except DistributedTrainingError as e:
        sys.exit(f"charlm: error: {e}")
    for n in alive:
        print(json.dumps(n))


def start(argv: list[str]) -> None:
    loopback = _loopback_target(argv)
    if loopback:
        os.environ[LOCAL_ONLY_ENV] = "0"  # before Ray is imported: it reads it once, at import
    from ray.scripts import scripts

    if loopback and "--head" not in argv:
        # `ray start`'s own module sees a cluster-enabled Ray (so it adds the worker node); every
        # other module, and every process the node starts, stays local-only (so all bind loopback).
        constants = types.ModuleType(scripts.ray_constants.__name__)
        constants.__dict__.update(vars(scripts.ray_constants))
        constants.ENABLE_RAY_CLUSTER = True
        scripts.ray_constants = constants
    scripts.cli.main(args=["start", *argv], prog_name="ray")


if __name__ == "__main__":
    main()
