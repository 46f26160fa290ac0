"""Before joining a Ray cluster: check that RAY_ADDRESS answers, within seconds, and say why not.

`ray.init(address=...)` retries an address that does not answer for many minutes (Ray 2.60 printed
"Failed to connect to GCS at address ..." every 40 s for 11 minutes), and waits a minute for a node
on this machine before saying there is none. check_cluster() asks the same questions with short
timeouts first and raises one DistributedTrainingError naming the address and the likely cause.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Any

from charlm.distributed.errors import DistributedTrainingError, first_line

# How long each question may take; the three together stay under 30 s.
CONNECT_TIMEOUT_S = 5.0
GCS_TIMEOUT_S = 15.0
NODE_TIMEOUT_S = 3.0

JOIN_HINT = (
    "a driver on a cluster node uses the GCS address HOST:PORT; from any other machine use Ray Client "
    "(RAY_ADDRESS=ray://HEAD:10001) or `ray job submit --address http://HEAD:8265` (docs/distributed.md)"
)


def split_address(address: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a Ray address: `host:port`, `ray://host:port`, `http://host:port`,
    `[::1]:port`; scheme is '' for a bare GCS address, port None where none is given."""
    scheme, sep, rest = address.strip().partition("://")
    if not sep:
        scheme, rest = "", address.strip()
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):  # [v6]:port
        host, _, tail = rest[1:].partition("]")
        port = tail.removeprefix(":")
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:
        host, port = rest, ""
    return scheme.lower(), host, int(port) if port.isdigit() else None


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address (any form split_address reads) names this machine's loopback."""
    return bool(address) and is_loopback_host(split_address(address)[1])


def check_cluster(address: str) -> None:
    """Raise DistributedTrainingError unless `address` (RAY_ADDRESS) is a Ray cluster this process
    can join: something answers there, it is a GCS with live nodes, and (for a GCS address) one of
    them runs on this machine at an address that answers. `auto` and other port-less forms are left
    to Ray."""
    scheme, host, port = split_address(address)
    where = f"RAY_ADDRESS={address}"
    if scheme in ("http", "https"):
        raise DistributedTrainingError(
            f"{where} is a dashboard address, for `ray job submit --address`; {JOIN_HINT}"
        )
    if scheme not in ("", "ray"):
        raise DistributedTrainingError(f"{where}: unknown scheme {scheme}://; {JOIN_HINT}")
    if port is None:
        return
    if scheme == "ray":
        _connect(where, host, port, CONNECT_TIMEOUT_S, "the Ray head")
        return  # Ray Client: the driver runs on the cluster; the client server answered
    _check_local_node(where, live_nodes(address))


def live_nodes(address: str) -> list[dict[str, Any]]:
    """The live nodes ({node_id, ip, port, head}) of the cluster whose GCS is at HOST:PORT, each
    question bounded as in check_cluster."""
    scheme, host, port = split_address(address)
    where = f"RAY_ADDRESS={address}"
    if scheme or port is None:
        raise DistributedTrainingError(f"{where}: not a GCS address HOST:PORT")
    _connect(where, host, port, CONNECT_TIMEOUT_S, "the Ray head")
    return _alive_nodes(where, f"{host}:{port}")


def _connect(where: str, host: str, port: int, timeout: float, what: str) -> None:
    """A TCP connect to host:port, or one error saying why it failed."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except socket.gaierror as e:
        why = f"the host name {host} does not resolve ({e.strerror})"
    except ConnectionRefusedError:
        why = (
            f"nothing listens on {host}:{port} (connection refused): is {what} running, and is this its port?"
        )
    except TimeoutError:
        why = (
            f"no answer from {host}:{port} within {timeout:g} s: {what} is down, or a firewall drops the port"
        )
    except OSError as e:
        why = f"cannot reach {host}:{port}: {e.strerror or first_line(e)}"
    raise DistributedTrainingError(f"{where}: {why}")


def _alive_nodes(where: str, gcs: str) -> list[dict[str, Any]]:
    """The cluster's live nodes, as its GCS lists them; asked in a thread so that a port that accepts
    connections but never answers as a GCS costs GCS_TIMEOUT_S, not Ray's minutes of retries."""
    import ray
    from ray._raylet import GcsClient  # the client `ray status` uses; no public equivalent
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    out: dict[str, Any] = {}

    def ask() -> None:
        try:
            infos = GcsClient(address=gcs).get_all_node_info(
                timeout=GCS_TIMEOUT_S, state_filter=GcsNodeInfo.GcsNodeState.ALIVE
            )
            out["nodes"] = [
                {
                    "node_id": info.node_id.hex(),
                    "ip": info.node_manager_address,
                    "port": int(info.node_manager_port),
                    "head": bool(info.is_head_node),
                }
                for info in infos.values()
            ]
        except Exception as e:
            out["error"] = e

    t = threading.Thread(target=ask, name="charlm-gcs-probe", daemon=True)
    t.start()
    t.join(GCS_TIMEOUT_S + 1)
    if "nodes" in out:
        if not out["nodes"]:
            raise DistributedTrainingError(f"{where}: the Ray GCS answers but lists no live node")
        return out["nodes"]
    why = f" ({first_line(out['error'])})" if "error" in out else ""
    raise DistributedTrainingError(
        f"{where}: {gcs} accepts connections but no Ray GCS answered within {GCS_TIMEOUT_S:g} s{why}: "
        f"is it the head's GCS port (`ray start --head --port`), not the dashboard's or Ray Client's, "
        f"and is the head's Ray version this driver's ({ray.__version__})?"
    )


def _check_local_node(where: str, nodes: list[dict[str, Any]]) -> None:
    """A driver joining by GCS address attaches to a node on its own machine (Ray finds its raylet
    among this machine's processes): there must be one, at an address that answers."""
    from ray._private import services

    listed = ", ".join(f"{n['ip']}:{n['port']}" for n in nodes)
    local_ids = set(services.find_node_ids())
    local = [n for n in nodes if n["node_id"] in local_ids]
    if not local:
        raise DistributedTrainingError(
            f"{where}: the cluster answers, but none of its nodes ({listed}) runs on this machine; {JOIN_HINT}"
        )
    errors = []
    for n in local:
        try:
            _connect(where, n["ip"], n["port"], NODE_TIMEOUT_S, "this machine's Ray node")
            return
        except DistributedTrainingError as e:
            errors.append(str(e).removeprefix(f"{where}: "))
    raise DistributedTrainingError(
        f"{where}: this machine's Ray node registered itself at an address that does not answer here "
        f"({errors[0]}); start it with --node-ip-address set to an address its peers and drivers reach"
    )
