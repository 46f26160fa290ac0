"""Prefect flow `train-model`: a dataset in the store -> a trained run in <store>/runs/<name>/.

Wiring only; the work is charlm.distributed.train_distributed (Ray Train, N DDP workers). Ray is
started in the flow's main thread and Ray Train is called from a task that runs in that thread
(called directly, never .submit(): Ray's core processes die with the thread that started them).
Tasks hand back small dicts and URLs; checkpoints stay in the store.

Re-running the flow with the same parameters resumes the same run (its name is derived from the
parameters) or, when it finished, returns it without training again.

    python -m flows.train DATASET [--workers 2] [--max-steps 200] [--store URL]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from charlm.config import TrainConfig
from charlm.refs import DataRef, resolve_data
from flows.retries import known_keys

SCALING_KEYS = (
    "workers",
    "use_gpu",
    "max_failures",
    "num_to_keep",
    "cpus_per_worker",
    "collective_timeout_s",
)
RESULT_KEYS = (
    "run_name",
    "run_url",
    "best_checkpoint",
    "last_checkpoint",
    "dataset_id",
    "corpus_fingerprint",
    "steps",
    "epochs",
    "stopped_by",
    "best_val_loss",
    "best_val_bpc",
    "val_loss",
    "val_bpc",
    "chars_per_s",
    "workers",
    "use_gpu",
    "restarts",
    "resumed_from_step",
    "already_finished",
)


@task(name="train-distributed", cache_policy=NONE)
def train_distributed_task(
    dataset: DataRef,
    config: dict[str, Any],
    scaling: dict[str, Any],
    store: str | None,
    run_name: str | None,
    resume: bool,
    extra_callbacks: Callable[[], list] | None = None,
    rank_callbacks: Callable[[int, int], list] | None = None,
) -> dict[str, Any]:
    from charlm.distributed import train_distributed

    summary = train_distributed(
        TrainConfig.from_dict(config),
        dataset,
        store=store,
        run_name=run_name,
        resume=resume,
        extra_callbacks=extra_callbacks,
        rank_callbacks=rank_callbacks,
        **scaling,
    )
    logger = get_run_logger()
    if summary.get("already_finished"):
        logger.info("run %s had already finished: %s", summary["run_name"], summary["run_url"])
    else:
        logger.info(
            "run %s: %s steps, best val %s bpc, %s restart(s); %s",
            summary["run_name"],
            summary["steps"],
            summary["best_val_bpc"],
            summary["restarts"],
            summary["run_url"],
        )
    return {k: summary.get(k) for k in RESULT_KEYS}


def _artifact_key(name: str) -> str:
    return ("run-" + re.sub(r"[^a-z0-9-]+", "-", name.lower())).strip("-")[:100]


@flow(name="train-model")
def train_model(
    dataset: str,
    config: dict[str, Any] | None = None,
    scaling: dict[str, Any] | None = None,
    store: str | None = None,
    run_name: str | None = None,
    resume: bool = False,
    extra_callbacks: Callable[[], list] | None = None,
    rank_callbacks: Callable[[int, int], list] | None = None,
) -> dict[str, Any]:
    """Train on `dataset` (id, name or URL in the store) with `config` (TrainConfig fields; unset
    ones take their defaults) on Ray with `scaling` ({"workers": 2, "use_gpu": None,
    "max_failures": 2, ...}). Returns the run's name, URL, checkpoint URLs and headline metrics.

    extra_callbacks / rank_callbacks: picklable factories of charlm callbacks, called inside the
    workers on rank 0 / on every rank as f(rank, world_size) (tracking, fault drills)."""
    from charlm.distributed import ensure_ray

    cfg = TrainConfig.from_dict(dict(config or {"max_epochs": 10})).to_dict()
    sc = known_keys("scaling", scaling, SCALING_KEYS)
    data = resolve_data(dataset, store)  # once, at the flow's edge
    if getattr(data, "note", None):
        get_run_logger().warning(data.note)
    ensure_ray()  # here, in the flow's main thread
    result = train_distributed_task(data, cfg, sc, store, run_name, resume, extra_callbacks, rank_callbacks)
    create_markdown_artifact(
        key=_artifact_key(result["run_name"]),
        markdown=(
            f"### charlm run `{result['run_name']}`\n\n"
            f"| | |\n|---|---|\n"
            f"| run folder | `{result['run_url']}` |\n"
            f"| best checkpoint | `{result['best_checkpoint']}` |\n"
            f"| dataset | `{result['dataset_id'] or dataset}` |\n"
            f"| steps | {result['steps']} |\n"
            f"| best val bpc | {result['best_val_bpc']} |\n"
            f"| workers | {result['workers']} ({'GPU' if result['use_gpu'] else 'CPU'}) |\n"
            f"| restarts | {result['restarts']} |\n"
        ),
        description=f"charlm training run {result['run_url']}",
    )
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m flows.train", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-epochs", type=float, default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--run-name", default=None)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    config = {"max_steps": a.max_steps, "max_epochs": a.max_epochs}
    if a.max_steps is None and a.max_epochs is None:
        config["max_epochs"] = 10
    out = train_model(a.dataset, config, {"workers": a.workers}, a.store, a.run_name, a.resume)
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
