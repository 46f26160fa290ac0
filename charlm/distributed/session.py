"""The Ray session: start or join Ray once per process, keep a local one on loopback, and size
the workers and actors against what the cluster has."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from charlm.distributed.errors import DistributedTrainingError, first_line
from charlm.distributed.probe import check_cluster, is_loopback_address, is_loopback_host

# Settings measured to halve a fit's start-up on a small machine (docs/distributed.md); the
# caller's environment wins. Telemetry off.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}
# Non-secret settings the workers need to reach the same store; credentials are never passed
# through Ray (workers read them from their own environment, as the driver does).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_MAX_ATTEMPTS",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "CHARLM_STORE",
    *RAY_ENV_DEFAULTS,
)


def ensure_ray(num_cpus: int | None = None) -> str:
    """Start (or join) Ray once per process; returns the cluster address ('local' if in-process).

    Without RAY_ADDRESS: an in-process local Ray with `num_cpus` (default: this machine's cores),
    bound to loopback only, no dashboard, usage stats off, token auth off (nothing off the
    machine can reach it), temp files under RAY_TMPDIR. With RAY_ADDRESS:
    joins that cluster, no resource arguments. Must run in the main thread (Ray's core processes
    die with the thread that started them).
    """
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address or is_loopback_address(address):
        # Ray's local-only mode (its default on macOS/Windows): every Ray process, the GCS,
        # raylets and workers, binds 127.0.0.1 instead of the host's address and all interfaces.
        # Joining a cluster on loopback needs it too: outside it, Ray rewrites 127.0.0.1 in
        # RAY_ADDRESS to the host's routable address, where a loopback-bound head never answers.
        # Read when ray is imported, so it is set before the import and patched after it.
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    import ray

    if ray.is_initialized():
        return cluster_address()
    if threading.current_thread() is not threading.main_thread():
        raise DistributedTrainingError(
            "Ray must be started in the main thread: call charlm.distributed.ensure_ray() there "
            "first (a Prefect task run with .submit() runs in a worker thread)"
        )
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": "charlm.distributed.session._worker_setup"}
    try:
        if address:
            _local_only(ray)
            check_cluster(address)
            runtime_env["env_vars"] = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            if not address.startswith("ray://"):
                # Ray Train's actors call Ray's state API, which otherwise looks for "the" Ray of
                # their machine and fails where a machine runs several (nodes of one-machine
                # clusters, or other users' Rays).
                runtime_env["env_vars"]["RAY_ADDRESS"] = address
            ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            _local_only(ray)
            tmp = os.environ.setdefault(
                "RAY_TMPDIR", os.path.join(tempfile.gettempdir(), f"charlm-ray-{os.getuid()}")
            )
            os.makedirs(tmp, exist_ok=True)
            ray.init(
                address="local",  # a new in-process cluster, never one found on the machine
                num_cpus=num_cpus or _local_cpus(),
                include_dashboard=False,
                logging_level="WARNING",
                runtime_env=runtime_env,
                _temp_dir=tmp,
            )
    except DistributedTrainingError:
        raise
    except Exception as e:
        where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
        raise DistributedTrainingError(f"could not start {where}: {first_line(e)}") from e
    return cluster_address()


def _loopback_only() -> bool:
    """The in-process Ray of ensure_ray, or a cluster on loopback, in local-only mode (the user may
    have switched it off)."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return (not address or is_loopback_address(address)) and os.environ.get(LOCAL_ONLY_ENV) == "0"


def _local_only(ray: Any) -> None:
    """Keep an in-process Ray (or the driver of a loopback cluster) on loopback even when `ray` was
    imported before ensure_ray ran (Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into a module
    constant at import)."""
    if not _loopback_only():
        return
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def torch_config(base: Any, backend: str, timeout_s: int) -> Any:
    """Ray Train's TorchConfig; on a local-only Ray, one whose rendezvous store listens on
    loopback. torch's TCPStore server (rank 0) binds every interface whatever MASTER_ADDR says;
    this backend first has each worker hand it a socket bound to MASTER_ADDR instead."""
    if not _loopback_only():
        return base(backend=backend, timeout_s=timeout_s)
    from ray.train.torch.config import _TorchBackend

    class LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            worker_group.execute(_rendezvous_on_loopback)
            super().on_start(worker_group, backend_config)

    @dataclass
    class LoopbackTorchConfig(base):  # type: ignore[misc, valid-type]
        @property
        def backend_cls(self) -> type:
            return LoopbackTorchBackend

    return LoopbackTorchConfig(backend=backend, timeout_s=timeout_s)


def _rendezvous_on_loopback() -> None:
    """In a Ray Train worker: make rank 0's TCPStore listen only on a loopback MASTER_ADDR."""
    import importlib

    import torch.distributed as dist

    # The module, not torch.distributed.rendezvous(), the function of the same name.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create = rendezvous._create_c10d_store
    if getattr(create, "charlm_loopback", False):
        return

    def create_on_loopback(
        hostname: str, port: int, rank: int, world_size: int, timeout: Any, use_libuv: bool = True
    ) -> Any:
        if rank != 0 or not is_loopback_host(hostname):
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((hostname, port))
        return dist.TCPStore(
            host_name=hostname,
            port=port,
            world_size=world_size,
            is_master=True,
            timeout=timeout,
            multi_tenant=True,
            use_libuv=use_libuv,
            master_listen_fd=sock.detach(),  # the store's server owns the socket from here
        )

    create_on_loopback.charlm_loopback = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create_on_loopback


def _worker_setup() -> None:
    """worker_process_setup_hook (every Ray worker process of charlm's jobs): keep the driver's
    console readable. Ray Train 2.60 logs every report with all its metrics at INFO outside its
    LoggingConfig; without the dashboard its placement-group cleaner warns every second that the
    state API is unavailable; botocore announces where it found credentials."""
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
        from ray.train.v2._internal.execution.controller import placement_group_cleaner
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(placement_group_cleaner.__name__).setLevel(logging.ERROR)


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cluster_address() -> str:
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        return "local"
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return os.environ["RAY_ADDRESS"]


def resources(workers: int, use_gpu: bool | None, cpus_per_worker: float | None) -> tuple[bool, float, int]:
    """(use_gpu, CPUs reserved per worker, torch threads per worker), checked against a local Ray so
    that an impossible request fails at once instead of waiting forever for resources."""
    import ray

    total = ray.cluster_resources()
    local = not os.environ.get("RAY_ADDRESS")
    gpus = float(total.get("GPU", 0.0))
    if use_gpu is None:
        use_gpu = gpus >= workers
    elif use_gpu and local and gpus < workers:
        raise DistributedTrainingError(
            f"--gpu with {workers} worker(s) needs {workers} GPU(s); this machine's Ray sees {gpus:g}"
        )
    if cpus_per_worker is None and os.environ.get("CHARLM_CPUS_PER_WORKER"):
        cpus_per_worker = float(os.environ["CHARLM_CPUS_PER_WORKER"])
    if cpus_per_worker is None:
        cpus = float(total.get("CPU", 1.0))
        if not local:
            cpus_per_worker = 1.0
        elif cpus >= workers:
            cpus_per_worker = float(int(cpus // workers))
        else:  # more workers than cores: share them (slower than fewer workers; allowed)
            cpus_per_worker = cpus / workers
    if cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker must be positive, got {cpus_per_worker}")
    if local and cpus_per_worker * workers > float(total.get("CPU", 0.0)) + 1e-9:
        raise DistributedTrainingError(
            f"{workers} worker(s) x {cpus_per_worker:g} CPU(s) exceed the {total.get('CPU', 0):g} CPUs "
            "of this machine's Ray"
        )
    return bool(use_gpu), float(cpus_per_worker), max(1, int(cpus_per_worker))
