"""Inside each Ray Train worker: load the data, restore from Ray's checkpoint, and call
charlm.train.train (the one training loop) with the Dist hooks and a Ray reporter callback."""

from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
import time
from typing import Any

from charlm import runs
from charlm.config import TrainConfig
from charlm.distributed.dataspec import load_worker_data


def _rank_view(ck: dict[str, Any], rank: int, world: int, batch_size: int) -> dict[str, Any]:
    """The checkpoint as rank `rank` resumes it: its own rows of the all-streams carry."""
    carry = ck.get("carry")
    if carry is None or world == 1 or carry[0].shape[1] != batch_size * world:
        return ck
    rows = slice(rank * batch_size, (rank + 1) * batch_size)
    return {**ck, "carry": [t[:, rows].contiguous() for t in carry]}


def _limits_reached(cfg: TrainConfig, ck: dict[str, Any], batches_per_epoch: int) -> bool:
    """Whether a checkpoint is already at the end of the run (a driver died after the last report),
    by charlm.train's own stop rule."""
    from charlm.train import limit_reached

    epoch = int(ck["epoch"]) + int(ck["batch_in_epoch"]) / max(1, batches_per_epoch)
    return limit_reached(cfg, int(ck["step"]), epoch, float(ck.get("train_seconds", 0.0))) is not None


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
                ckpt_mod.save(ck, os.path.join(d, runs.CKPT_FILE))
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
    vocab, splits, fp, label = load_worker_data(config["data"], config.get("payload"))
    batch_size, _ = check_sizes(
        splits, cfg.batch_size, cfg.seq_len, world_size=world, auto_shrink=cfg.auto_shrink, name=label
    )

    resume = None
    found = rt.get_checkpoint()
    if found is not None:
        with found.as_directory() as d:
            resume = ckpt_mod.load(os.path.join(d, runs.CKPT_FILE), name=f"{found.path}/{runs.CKPT_FILE}")
    nodes = _node_ids(world)
    if rank == 0:
        rec = {
            "time": time.time(),
            "driver": config["driver"],
            "resumed_from_step": int(resume["step"]) if resume is not None else None,
            "world_size": world,
            "device": str(device),
            "host": socket.gethostname(),
            "nodes": nodes,  # the Ray node id of each rank, in rank order
        }
        runs.write_attempt(config["run_url"], rec)
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


def _node_ids(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (a collective: every rank calls it)."""
    import ray

    mine = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [mine]
    import torch.distributed as tdist

    ids: list[Any] = [None] * world
    tdist.all_gather_object(ids, mine)
    return [str(i) for i in ids]


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
