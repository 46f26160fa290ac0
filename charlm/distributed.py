"""Ray Train adapter: charlm's one training loop on N data-parallel workers (the only Ray import).

`train_distributed` runs `charlm.train.train` in every worker of a `TorchTrainer` (DDP; gloo on
CPU, nccl on GPU); the workers differ from `charlm train` only in the `Dist` hooks (all-reduce
based) and in the callbacks they pass (a Ray reporter on every rank, plus the caller's).

Data: every rank opens the dataset version from the store itself (a raw local corpus is encoded
once by the driver and shipped through Ray's object store) and takes its own contiguous streams:
the global batch is `batch_size` streams per rank x N ranks, laid out exactly like one process
with `batch_size * N` streams (see charlm.data). Ranks never share a stream.

Run folder `<store>/runs/<name>/` (local folder or any fsspec URL, e.g. s3:// with
AWS_ENDPOINT_URL): `run.json` (parameters, written before training), Ray's
`checkpoint_<step>/checkpoint.pt` (charlm's checkpoint schema, rank 0, every evaluation; the
best by val loss and the latest are kept), `attempts/*.json` (one per worker-group start, with the
step it resumed from), and after success `best.pt`, `last.pt` and `summary.json` (written last),
so `charlm sample <store>/runs/<name>` needs no Ray (see charlm.runs).

Checkpoints hold the recurrent state of *all* streams (carry of shape (L, B*N, H), gathered from
the ranks), so a restart gives every rank its own state back and continues bit for bit.

Fault tolerance: a worker failure restarts the whole group from the last checkpoint, up to
`max_failures` times. A driver failure: run the same call again. The run name is derived from the
parameters (config, dataset fingerprint, workers), so the same command resumes the same run and
a different one never picks it up; an explicit `run_name` must be new unless `resume=True`.

Ray: local by default (`ray.init` in-process, in the main thread, dashboard and usage stats off);
with RAY_ADDRESS set, the same code joins that cluster.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from charlm import storage
from charlm.config import TrainConfig

CKPT_FILE = "checkpoint.pt"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
ATTEMPTS_DIR = "attempts"
RUN_FORMAT = "charlm.run/1"
log = logging.getLogger(__name__)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

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


class DistributedTrainingError(RuntimeError):
    """A distributed run failed or cannot start; the message names the run and what to do."""


class RunExistsError(DistributedTrainingError):
    pass


class RunNotFoundError(DistributedTrainingError):
    pass


# -- Ray session -------------------------------------------------------------------------------------
def ensure_ray(num_cpus: int | None = None) -> str:
    """Start (or join) Ray once per process; returns the cluster address ('local' if in-process).

    Without RAY_ADDRESS: an in-process local Ray with `num_cpus` (default: this machine's cores),
    bound to loopback only, no dashboard, usage stats off, token auth off (nothing off the
    machine can reach it), temp files under RAY_TMPDIR. With RAY_ADDRESS:
    joins that cluster, no resource arguments. Must run in the main thread (Ray's core processes
    die with the thread that started them).
    """
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray's local-only mode (its default on macOS/Windows): every Ray process, the GCS,
        # raylets and workers, binds 127.0.0.1 instead of the host's address and all interfaces.
        # Read when ray is imported, so it is set before the import and patched after it.
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    import ray

    if ray.is_initialized():
        return _address()
    if threading.current_thread() is not threading.main_thread():
        raise DistributedTrainingError(
            "Ray must be started in the main thread: call charlm.distributed.ensure_ray() there "
            "first (a Prefect task run with .submit() runs in a worker thread)"
        )
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": "charlm.distributed._worker_setup"}
    try:
        if address:
            runtime_env["env_vars"] = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
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
    except Exception as e:
        where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
        raise DistributedTrainingError(f"could not start {where}: {_first_line(e)}") from e
    return _address()


def _loopback_only() -> bool:
    """The in-process Ray of ensure_ray, in local-only mode (the user may have switched it off)."""
    return not os.environ.get("RAY_ADDRESS") and os.environ.get(LOCAL_ONLY_ENV) == "0"


def _local_only(ray: Any) -> None:
    """Keep an in-process Ray on loopback even when `ray` was imported before ensure_ray ran
    (Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into a module constant at import)."""
    if not _loopback_only():
        return
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _torch_config(base: Any, backend: str, timeout_s: int) -> Any:
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
        if rank != 0 or not _is_loopback(hostname):
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def _address() -> str:
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        return "local"
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return os.environ["RAY_ADDRESS"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- data ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """What the workers train on: a published dataset (read by every rank from the store) or a
    raw corpus the driver encoded ('inline', shipped through Ray's object store)."""

    kind: str  # "dataset" | "inline"
    url: str | None  # the dataset folder (kind == "dataset")
    id: str  # dataset id, or the corpus fingerprint for a raw corpus
    fingerprint: str
    label: str
    vocab_size: int


def resolve_data(data_ref: str, cfg: TrainConfig, store: str | None = None) -> tuple[DataSpec, Any]:
    """(spec, payload): payload is None for a dataset, else (vocab dict, splits) to ship."""
    from charlm import datasets

    folder = datasets.resolve(data_ref, store)
    if folder is not None:
        from charlm.ingest import read_manifest

        m = read_manifest(folder)
        if m is None:
            raise DistributedTrainingError(f"{folder}: dataset has no manifest.json")
        did = str(m["id"])
        return (
            DataSpec(
                "dataset", folder, did, str(m["fingerprint"]), f"dataset {did}", int(m["vocab"]["size"])
            ),
            None,
        )
    # A raw corpus (file, folder, builtin): encoded once here with the same rules as `charlm train`.
    from charlm.trainingdata import load_training_data

    vocab, splits, fp, label = load_training_data(data_ref, cfg.val_frac, cfg.test_frac, store)
    spec = DataSpec("inline", None, fp, fp, label, len(vocab))
    return spec, (vocab.to_dict(), {k: v for k, v in splits.items()})


def _load_worker_data(spec: dict[str, Any], payload_ref: Any):
    from charlm.vocab import Vocab

    if spec["kind"] == "dataset":
        from charlm import datasets

        ds = datasets.load(spec["url"])
        return ds.vocab, ds.splits, ds.fingerprint, spec["label"]
    import ray

    vocab_d, splits = ray.get(payload_ref)
    return Vocab.from_dict(vocab_d), splits, spec["fingerprint"], spec["label"]


# -- run names and folders -------------------------------------------------------------------------------
def derive_run_name(cfg: TrainConfig, data_id: str, workers: int) -> str:
    """A name that is a pure function of what decides the run: the same command gets the same name
    (and resumes), any other parameter gives another."""
    key = json.dumps(
        {"train_config": cfg.to_dict(), "data": data_id, "workers": int(workers)}, sort_keys=True
    )
    h = hashlib.sha256(key.encode()).hexdigest()
    return f"charlm-{data_id[:8]}-w{int(workers)}-{h[:12]}"


def check_run_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"run name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def runs_root(store: str | None = None) -> str:
    return storage.join(storage.store_root(store), "runs")


def run_url(name: str, store: str | None = None) -> str:
    return storage.join(runs_root(store), check_run_name(name))


def _read_json(url: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(url))
    except storage.ObjectNotFoundError:
        return None
    except ValueError as e:
        raise DistributedTrainingError(f"{url}: unreadable ({e})") from None


def _run_record(cfg: TrainConfig, spec: DataSpec, data_ref: str, name: str, workers: int) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_ref": data_ref,
        "data": asdict(spec),
        "workers": int(workers),
        "train_config": cfg.to_dict(),
    }


def _check_same_run(record: dict[str, Any], cfg: TrainConfig, spec: DataSpec, workers: int, url: str) -> None:
    diffs = []
    old_cfg = record.get("train_config", {})
    for k, v in cfg.to_dict().items():
        if old_cfg.get(k) != v:
            diffs.append(f"{k} {old_cfg.get(k)!r} -> {v!r}")
    if record.get("data", {}).get("fingerprint") != spec.fingerprint:
        diffs.append(f"data {record.get('data', {}).get('label')} -> {spec.label}")
    if record.get("workers") != workers:
        diffs.append(f"workers {record.get('workers')} -> {workers}")
    if diffs:
        raise RunExistsError(
            f"{url}: run was started with other parameters ({'; '.join(diffs[:4])}); "
            "resume it with the same ones or choose another --run-name"
        )


def _attempts(url: str) -> list[dict[str, Any]]:
    out = []
    for u in storage.ls(storage.join(url, ATTEMPTS_DIR)):
        if u.endswith(".json") and not storage.basename(u).startswith("."):
            rec = _read_json(u)
            if rec is not None:
                out.append(rec)
    out.sort(key=lambda r: r.get("time", 0.0))
    return out


# -- inside the workers ----------------------------------------------------------------------------------
def _rank_view(ck: dict[str, Any], rank: int, world: int, batch_size: int) -> dict[str, Any]:
    """The checkpoint as rank `rank` resumes it: its own rows of the all-streams carry."""
    carry = ck.get("carry")
    if carry is None or world == 1 or carry[0].shape[1] != batch_size * world:
        return ck
    rows = slice(rank * batch_size, (rank + 1) * batch_size)
    return {**ck, "carry": [t[:, rows].contiguous() for t in carry]}


def _limits_reached(cfg: TrainConfig, ck: dict[str, Any], batches_per_epoch: int) -> bool:
    """Whether a checkpoint is already at the end of the run (a driver died after the last report)."""
    if cfg.max_steps is not None and int(ck["step"]) >= cfg.max_steps:
        return True
    epoch = int(ck["epoch"]) + int(ck["batch_in_epoch"]) / max(1, batches_per_epoch)
    if cfg.max_epochs is not None and epoch >= cfg.max_epochs:
        return True
    return cfg.time_budget is not None and float(ck.get("train_seconds", 0.0)) >= cfg.time_budget * 60.0


def _make_dist(rank: int, world: int, device: Any):
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from charlm.train import Dist

    def mean(x: float) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        return float(t.item()) / world

    def any_(b: bool) -> bool:
        t = torch.tensor([1 if b else 0], dtype=torch.int32, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(m, device_ids=ids, gradient_as_bucket_view=True)

    return Dist(rank=rank, world_size=world, mean=mean, any=any_, wrap=wrap)


def _gather(t: Any, world: int) -> list[Any]:
    import torch
    import torch.distributed as tdist

    parts = [torch.empty_like(t) for _ in range(world)]
    tdist.all_gather(parts, t.contiguous())
    return parts


def _make_reporter(rank: int, world: int, device: Any):
    """A Callback (built here so that the module imports without torch) reporting every evaluation to
    Ray on every rank (report() is a barrier); rank 0 attaches the checkpoint."""
    import torch
    from ray import train as rt

    from charlm import checkpoint as ckpt_mod
    from charlm.train import Callback

    class RayReporter(Callback):
        def __init__(self) -> None:
            self.last_log: dict[str, Any] = {}
            self.evals: list[dict[str, Any]] = []  # this attempt's evaluations, for the summary

        def on_log(self, run, metrics):
            self.last_log = metrics

        def on_eval(self, run, metrics):
            out = {k: v for k, v in self.last_log.items() if k not in metrics}
            out.update(metrics)
            self.evals.append(
                {k: out.get(k) for k in ("step", "epoch", "train_loss", "val_loss", "val_bpc", "lr")}
            )
            carry = run.carry
            wcps = float(self.last_log.get("worker_chars_per_s", 0.0))
            if world > 1:
                if carry is not None:
                    carry = tuple(torch.cat(_gather(t, world), dim=1) for t in carry)
                rates = _gather(torch.tensor([wcps], dtype=torch.float64, device=device), world)
                per_worker = [float(r.item()) for r in rates]
            else:
                per_worker = [wcps]
            out["workers_chars_per_s"] = per_worker
            out["chars_per_s_total"] = sum(per_worker)
            out["world_size"] = world
            name = f"checkpoint_{run.step:09d}"
            if rank != 0:
                rt.report(out, checkpoint=None, checkpoint_dir_name=name)
                return
            ck = run.checkpoint()
            ck["carry"] = [t.detach().to("cpu", copy=True) for t in carry] if carry is not None else None
            with tempfile.TemporaryDirectory(prefix="charlm-ckpt-") as d:
                ckpt_mod.save(ck, os.path.join(d, CKPT_FILE))
                rt.report(out, checkpoint=rt.Checkpoint.from_directory(d), checkpoint_dir_name=name)

    return RayReporter()


def _train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's train_loop_per_worker: load data, restore, call charlm.train.train."""
    import torch
    from ray import train as rt

    from charlm import checkpoint as ckpt_mod
    from charlm.data import StreamBatcher, check_sizes
    from charlm.train import train

    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    if config["use_gpu"]:
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device("cpu")
    cfg = TrainConfig.from_dict(config["train_config"])
    vocab, splits, fp, label = _load_worker_data(config["data"], config.get("payload"))
    batch_size, _ = check_sizes(
        splits, cfg.batch_size, cfg.seq_len, world_size=world, auto_shrink=cfg.auto_shrink, name=label
    )

    resume = None
    found = rt.get_checkpoint()
    if found is not None:
        with found.as_directory() as d:
            resume = ckpt_mod.load(os.path.join(d, CKPT_FILE), name=f"{found.path}/{CKPT_FILE}")
    if rank == 0:
        rec = {
            "time": time.time(),
            "driver": config["driver"],
            "resumed_from_step": int(resume["step"]) if resume is not None else None,
            "world_size": world,
            "device": str(device),
            "host": socket.gethostname(),
        }
        storage.write_text_atomic(
            storage.join(config["run_url"], ATTEMPTS_DIR, f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"),
            json.dumps(rec),
        )
    if resume is not None:
        bpe = StreamBatcher(
            splits["train"], batch_size, cfg.seq_len, rank, world, seed=cfg.seed
        ).batches_per_epoch(int(resume["epoch"]))
        if _limits_reached(cfg, resume, bpe):  # finished; only the driver's publishing was lost
            return _result_from_checkpoint(resume, world, batch_size, device) if rank == 0 else None
        resume = _rank_view(resume, rank, world, batch_size)

    dist = _make_dist(rank, world, device) if world > 1 else None
    reporter = _make_reporter(rank, world, device)
    callbacks: list[Any] = [reporter]
    if config.get("rank_callbacks") is not None:
        callbacks.extend(config["rank_callbacks"](rank, world))
    if rank == 0:
        if config.get("extra_callbacks") is not None:
            callbacks.extend(config["extra_callbacks"]())
        if not config.get("quiet", True):
            from charlm.callbacks import ProgressBar

            callbacks.append(ProgressBar(stream=sys.stderr))
    result = train(
        cfg,
        vocab,
        splits,
        callbacks=callbacks,
        resume=resume,
        device=device,
        dist=dist,
        corpus_fingerprint=fp,
        corpus_name=label,
    )
    return {**result, "evals": reporter.evals} if rank == 0 else None


def _result_from_checkpoint(ck: dict[str, Any], world: int, batch_size: int, device: Any) -> dict[str, Any]:
    best, last = ck.get("best_val_loss"), ck.get("val_loss")
    return {
        "steps": int(ck["step"]),
        "epochs": float(ck.get("metrics", {}).get("epoch", ck["epoch"])),
        "stopped_by": "already_finished",
        "best_val_loss": best,
        "best_val_bpc": best / math.log(2) if best is not None else None,
        "val_loss": last,
        "val_bpc": last / math.log(2) if last is not None else None,
        "train_loss": None,
        "chars_per_s": 0.0,
        "train_seconds": float(ck.get("train_seconds", 0.0)),
        "evals": [],
        "batch_size": batch_size,
        "device": str(device),
        "world_size": world,
    }


# -- the driver ---------------------------------------------------------------------------------------------
def _resources(workers: int, use_gpu: bool | None, cpus_per_worker: float | None) -> tuple[bool, float, int]:
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


def _ray_storage(runs: str):
    """(storage_path, storage_filesystem) for Ray's RunConfig, through charlm's storage adapter."""
    lp = storage.local_path(runs)
    if lp is not None:
        os.makedirs(lp, exist_ok=True)
        return lp, None
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(runs)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def train_distributed(
    cfg: TrainConfig,
    data_ref: str,
    *,
    store: str | None = None,
    workers: int = 2,
    use_gpu: bool | None = None,
    run_name: str | None = None,
    resume: bool = False,
    max_failures: int = 2,
    num_to_keep: int = 2,
    cpus_per_worker: float | None = None,
    collective_timeout_s: int = 180,
    extra_callbacks: Callable[[], list[Any]] | None = None,
    rank_callbacks: Callable[[int, int], list[Any]] | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Train under Ray Train on `workers` DDP workers; returns a JSON-able summary.

    data_ref: dataset id/prefix/name/URL in the store, or a raw corpus (file, folder, builtin).
    use_gpu: None = GPUs if the cluster has one per worker. run_name: None derives it from the
    parameters (same parameters -> same run, resumed if unfinished); an explicit name must be new
    unless resume=True, which requires the run to exist with the same parameters.
    max_failures: worker-group restarts allowed (from the last checkpoint). num_to_keep: Ray
    checkpoints kept (lowest val loss; the latest is always kept). collective_timeout_s: how long a
    rank waits in a collective for a dead peer. extra_callbacks: a picklable factory called on rank 0
    inside the worker; rank_callbacks: one called on every rank as f(rank, world_size).

    A finished run is not trained again: its summary is returned with "already_finished": True.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if max_failures < -1:
        raise ValueError(f"max_failures must be -1 (unlimited) or >= 0, got {max_failures}")
    root = storage.store_root(store)
    spec, payload = resolve_data(data_ref, cfg, root)
    name = check_run_name(run_name) if run_name else derive_run_name(cfg, spec.id, workers)
    url = run_url(name, root)

    record = _read_json(storage.join(url, RUN_FILE))
    if record is None:
        if resume:
            raise RunNotFoundError(f"{url}: no such run to resume (no {RUN_FILE})")
        if storage.ls(url):
            raise RunExistsError(f"{url}: folder exists but is not a charlm run; choose another run name")
    else:
        if run_name and not resume:
            raise RunExistsError(
                f"{url}: run {name} already exists; pass --resume-run to continue it or choose another --run-name"
            )
        _check_same_run(record, cfg, spec, workers, url)
        done = _read_json(storage.join(url, SUMMARY_FILE))
        if done is not None:
            log.warning("run %s already finished (%s); not training again", name, url)
            return {**done, "already_finished": True}
        log.warning("resuming run %s from its last checkpoint in %s", name, url)

    ensure_ray()
    use_gpu, cpus, threads = _resources(workers, use_gpu, cpus_per_worker)
    if record is None:
        storage.write_text_atomic(
            storage.join(url, RUN_FILE), json.dumps(_run_record(cfg, spec, data_ref, name, workers), indent=1)
        )

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

    driver = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    storage_path, storage_fs = _ray_storage(runs_root(root))
    resources = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "train_config": cfg.to_dict(),
            "data": asdict(spec),
            "payload": ray.put(payload) if payload is not None else None,
            "run_url": url,
            "threads": threads,
            "use_gpu": use_gpu,
            "driver": driver,
            "extra_callbacks": extra_callbacks,
            "rank_callbacks": rank_callbacks,
            "quiet": quiet,
        },
        torch_config=_torch_config(TorchConfig, "nccl" if use_gpu else "gloo", int(collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        if isinstance(e, WorkerGroupError) and e.worker_failures:
            why = _explain_worker_failures(e.worker_failures)
        else:
            why = _first_line(e).removeprefix("Training failed due to controller error:").strip()
        restarts = "no restarts allowed" if max_failures == 0 else f"after {max_failures} restart(s)"
        raise DistributedTrainingError(
            f"run {name} failed ({restarts}): {why}; checkpoints so far are kept in {url}: "
            "run the same command again (or --resume-run) to continue"
        ) from e
    fit_seconds = time.perf_counter() - t0
    return _publish(result, url, name, spec, workers, use_gpu, driver, fit_seconds)


_COLLATERAL = re.compile(
    r"remote worker|closed by peer|reset by peer|Connection refused|NCCL.*(abort|timeout)", re.I
)
_EXIT_DETAIL = re.compile(r"Worker exit detail: (.+?)(?:\. |\.?$)", re.S)


def _explain_worker_failures(failures: dict[int, BaseException]) -> str:
    """One line for the failure that caused the others: a worker's own error first, then a worker
    that died, and only then the collective errors its peers saw when it vanished."""

    def kind(err: BaseException) -> int:
        text = str(err)
        if "actor died" in text or "process has died" in text or "health check failed" in text:
            return 1
        return 2 if _COLLATERAL.search(text) else 0

    rank, err = min(failures.items(), key=lambda kv: (kind(kv[1]), kv[0]))
    if kind(err) == 1:
        m = _EXIT_DETAIL.search(str(err))
        return f"worker rank {rank} died ({m.group(1).strip() if m else 'its process exited'})"
    return f"worker rank {rank}: {type(err).__name__}: {_first_line(err)}"


def _publish(result, url, name, spec, workers, use_gpu, driver, fit_seconds) -> dict[str, Any]:
    """Copy the best and the last Ray checkpoint to best.pt / last.pt, then summary.json (last)."""
    from charlm import checkpoint as ckpt_mod

    if result.checkpoint is None:
        raise DistributedTrainingError(f"run {name} finished without reporting a checkpoint ({url})")

    def ck_url(ck) -> str:
        return storage.join(url, storage.basename(ck.path), CKPT_FILE)

    kept = [(ck, m) for ck, m in (result.best_checkpoints or []) if m.get("val_loss") is not None]
    best_ck = min(kept, key=lambda cm: (cm[1]["val_loss"], cm[1].get("step", 0)))[0] if kept else None
    last_src = ck_url(result.checkpoint)
    best_src = ck_url(best_ck) if best_ck is not None else last_src
    published = {}
    for target, src in (("best.pt", best_src), ("last.pt", last_src)):
        data = storage.read_bytes(src)
        ckpt_mod.load(data, name=src)  # never publish a file that does not load
        storage.write_bytes_atomic(storage.join(url, target), data)
        published[target] = storage.join(url, target)
    attempts = _attempts(url)
    mine = [a for a in attempts if a.get("driver") == driver]
    train_result = dict(result.return_value or {})
    metrics = result.metrics or {}
    summary = {
        "run_name": name,
        "run_url": url,
        "out_dir": url,
        "corpus": spec.label,
        "dataset_id": spec.id if spec.kind == "dataset" else None,
        "dataset_url": spec.url,
        "corpus_fingerprint": spec.fingerprint,
        "vocab_size": spec.vocab_size,
        "best_checkpoint": published["best.pt"],
        "last_checkpoint": published["last.pt"],
        "best_source": best_src,
        "last_source": last_src,
        **train_result,
        "workers": workers,
        "use_gpu": use_gpu,
        "backend": "nccl" if use_gpu else "gloo",
        "workers_chars_per_s": metrics.get("workers_chars_per_s"),
        "last_report": metrics,
        "restarts": max(0, len(mine) - 1),
        "resumed_from_step": mine[0].get("resumed_from_step") if mine else None,
        "attempts": attempts,
        "driver_sessions": len({a.get("driver") for a in attempts}),
        "fit_seconds": fit_seconds,
        "ray_address": _address(),
    }
    storage.write_text_atomic(storage.join(url, SUMMARY_FILE), json.dumps(summary, indent=1, default=str))
    return summary


# -- batch generation on Ray actors -------------------------------------------------------------------------
def _generator_actor_class():
    import ray

    @ray.remote
    class Generator:
        """Loads the model once; generates batches of records (charlm.genjob's executor contract)."""

        def __init__(
            self, ckpt: bytes, label: str, threads: int, use_gpu: bool, batch: int, precision: str
        ) -> None:
            import torch

            from charlm.checkpoint import load_model
            from charlm.sample import Sampler

            torch.set_num_threads(threads)
            device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
            model, vocab, _ = load_model(ckpt, name=label, device=device)
            self.sampler = Sampler(model, vocab, precision=precision, device=device, max_batch=batch)
            self.label = label

        def run(self, records: list, cfg_dict: dict) -> list[dict]:
            from charlm.generate import GenerateConfig, generate_records

            return generate_records(self.sampler, records, GenerateConfig.from_dict(cfg_dict), self.label)

    return Generator


def generate_on_ray(
    ckpt: bytes, label: str, shards: list[list[Any]], cfg: Any, progress: Callable[[int], None]
):
    """charlm.genjob executor: one Ray actor per shard (a GPU each when the cluster has one per
    actor), each loading the model once and generating its shard cfg.batch_size streams at a time.
    Returns the shards' records in order; progress(n) is called as batches finish."""
    import ray

    ensure_ray()
    use_gpu, cpus, threads = _resources(len(shards), None, None)
    Generator = _generator_actor_class()
    ckpt_ref = ray.put(ckpt)
    batch = min(cfg.batch_size, max(len(s) for s in shards))
    actors = [
        Generator.options(num_cpus=cpus, num_gpus=1 if use_gpu else 0).remote(
            ckpt_ref, label, threads, use_gpu, batch, cfg.precision
        )
        for _ in shards
    ]
    pending: dict[Any, tuple[int, int]] = {}
    for si, (actor, records) in enumerate(zip(actors, shards, strict=True)):
        for bi, start in enumerate(range(0, len(records), cfg.batch_size)):
            part = records[start : start + cfg.batch_size]
            pending[actor.run.remote(part, cfg.to_dict())] = (si, bi)
    results: dict[tuple[int, int], list[dict]] = {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            si, bi = pending.pop(done[0])
            try:
                results[(si, bi)] = ray.get(done[0])
            except Exception as e:
                raise DistributedTrainingError(f"generation actor {si} failed: {_first_line(e)}") from e
            progress(sum(1 for r in results[(si, bi)] if r["error"] is None))
    finally:
        for a in actors:
            ray.kill(a)
    return [
        [r for bi in sorted(b for s, b in results if s == si) for r in results[(si, bi)]]
        for si in range(len(shards))
    ]
