"""Prefect flow `sweep-configs`: a dataset in the store -> a Ray Tune sweep over TrainConfig, one
MLflow parent run with a child run per trial, the winner registered (charlm.sweep).

Wiring only; the work is charlm.sweep.run_sweep. Ray is started in the flow's main thread and the
sweep runs in a task called directly there (never .submit(): Ray's core processes die with the
thread that started them). The space is checked before Ray starts. Re-running the flow with the
same parameters continues a killed sweep, or returns a finished one without training again.

    python -m flows.sweep DATASET --space FILE [--trials 4] [--register NAME] [--store URL]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from charlm.config import TrainConfig
from charlm.refs import DataRef, resolve_data
from flows.retries import known_keys

OPTION_KEYS = (
    "trials",
    "scheduler",
    "grace_period",
    "reduction_factor",
    "cpus_per_trial",
    "max_failures",
    "name",
)


@task(name="run-sweep", cache_policy=NONE)
def sweep_task(
    dataset: DataRef,
    config: dict[str, Any],
    space: dict[str, Any],
    options: dict[str, Any],
    register: str | None,
    store: str | None,
) -> dict[str, Any]:
    from charlm.sweep import parse_space, run_sweep

    base = TrainConfig.from_dict(config)
    summary = run_sweep(
        dataset, base, parse_space(space, "space", base), register=register, store=store, **options
    )
    logger = get_run_logger()
    w = summary.get("winner") or {}
    logger.info(
        "sweep %s: %d trials, %d stopped early; winner %s at %s val bpc%s",
        summary["sweep"],
        len(summary["trials"]),
        sum(t["ended"].startswith("stopped") for t in summary["trials"]),
        w.get("trial_id"),
        w.get("best_val_bpc"),
        " (already finished)" if summary.get("already_finished") else "",
    )
    return {k: v for k, v in summary.items() if k != "trials"} | {
        "trials": [{k: v for k, v in t.items() if k != "curve"} for t in summary["trials"]]
    }


@flow(name="sweep-configs")
def sweep_configs(
    dataset: str,
    space: dict[str, Any],
    config: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    register: str | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """Sweep `space` (field -> {choice|grid|uniform|loguniform|int: [...]}, docs/sweeps.md) over
    `config` (the base TrainConfig; unset fields take their defaults, and a run length must be set)
    on `dataset` (id, name or URL in the store); `options`: trials, scheduler (asha|fifo),
    grace_period, reduction_factor, cpus_per_trial, max_failures, name. `register`: the winner
    becomes a new version of this model (no alias is moved: that is the evaluate flow's gate)."""
    from charlm.distributed import ensure_ray
    from charlm.sweep import parse_space, report

    base = TrainConfig.from_dict(config or {})
    parse_space(space, "space", base)  # refused before Ray starts
    opts = known_keys("options", options, OPTION_KEYS)
    ref = resolve_data(dataset, store)
    ensure_ray()  # the flow's main thread
    out = sweep_task(ref, base.to_dict(), space, opts, register, store)
    create_markdown_artifact(
        key="sweep-" + "".join(c if c.isalnum() else "-" for c in out["sweep"].lower())[:90],
        markdown=f"# sweep {out['sweep']}\n\n{report.table_markdown([{**t, 'curve': []} for t in out['trials']])}",
        description=f"trials of sweep {out['sweep']}, best val loss first",
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("--space", required=True, help="a YAML or JSON space file")
    p.add_argument("--config", default="{}", help="the base TrainConfig as JSON")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--scheduler", default="asha", choices=("asha", "fifo"))
    p.add_argument("--register", default=None)
    p.add_argument("--store", default=None)
    a = p.parse_args()
    from charlm.sweep import load_space

    space = load_space(a.space).to_dict()
    opts = {"scheduler": a.scheduler, **({"trials": a.trials} if a.trials is not None else {})}
    out = sweep_configs(a.dataset, space, json.loads(a.config), opts, a.register, a.store)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
