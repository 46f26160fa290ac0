"""`charlm sweep CORPUS --space FILE | --grid KEY=V1,V2 ...`: Ray Tune over the training config,
one MLflow parent run with a child run per trial, the winner registered (charlm.sweep)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_sweep(a: argparse.Namespace) -> dict[str, Any]:
    from charlm.cli import CLIError, resolve_corpus, train_config_from_args
    from charlm.sweep import grid_space, load_space, merge, run_sweep

    if a.space is None and not a.grid:
        raise CLIError("no search space: give --space FILE or --grid KEY=V1,V2")
    base = train_config_from_args(a)
    # The whole space is checked before anything starts (no Ray, no MLflow, no data read).
    space = merge(
        load_space(a.space, base) if a.space else None, grid_space(a.grid, base) if a.grid else None
    )
    corpus = resolve_corpus(a.corpus, a.store)
    return run_sweep(
        corpus,
        base,
        space,
        trials=a.trials,
        scheduler=a.scheduler,
        grace_period=a.grace_period,
        reduction_factor=a.reduction_factor,
        register=a.register,
        store=a.store,
        name=a.name,
        track=not a.no_track,
        tracking_uri=a.tracking_uri,
        experiment=a.experiment,
        cpus_per_trial=a.cpus_per_trial,
        max_failures=a.max_failures,
    )


def _print(summary: dict[str, Any]) -> None:
    from charlm.sweep import report

    out = sys.stdout
    done = " (already finished; nothing run)" if summary.get("already_finished") else ""
    out.write(f"sweep {summary['sweep']}{done}: {summary['sweep_url']}\n")
    out.write(report.table_markdown(summary["trials"]))
    w = summary.get("winner")
    if w is not None:
        out.write(
            f"winner: {w['trial_id']} best val loss {w['best_val_loss']:.4f} ({w['best_val_bpc']:.4f} bpc)\n"
        )
    ml = summary.get("mlflow") or {}
    if ml:
        out.write(f"MLflow parent run {ml.get('run_id')} in {ml.get('tracking_uri')}\n")
    reg = ml.get("registered")
    if reg:
        out.write(
            f"registered {reg['model_uri']} (no alias moved: `charlm models promote` or the evaluate flow)\n"
        )


def _run(a: argparse.Namespace) -> dict[str, Any]:
    summary = cmd_sweep(a)
    if not a.json:
        _print(summary)
    return summary


def add_commands(sub: argparse._SubParsersAction) -> None:
    from charlm.cli_flags import add_config_flags
    from charlm.config import TrainConfig

    p = sub.add_parser(
        "sweep",
        help="tune training configs with Ray Tune (ASHA), tracked as nested MLflow runs",
        description="Train one trial per sampled config with Ray Tune on the local Ray (or RAY_ADDRESS), "
        "stopping losing trials early with ASHA on val loss. The training flags set the base config every "
        "trial starts from; the space varies some of its fields. --time-budget/--max-steps/--max-epochs "
        "are per trial. Re-running the same command continues a killed sweep.",
    )
    p.add_argument("corpus", metavar="CORPUS")
    sp = p.add_argument_group("search space (docs/sweeps.md)")
    sp.add_argument(
        "--space",
        metavar="FILE",
        default=None,
        help="YAML or JSON file: field -> {choice|grid|uniform|loguniform|int: [...]}",
    )
    sp.add_argument(
        "--grid", metavar="KEY=V1,V2", action="append", default=[], help="every value of a field (repeatable)"
    )
    sp.add_argument(
        "--trials",
        type=int,
        default=None,
        help="samples of the space (Tune's num_samples; each grid combination runs this many times); "
        "default 4 with random ranges, 1 with grids only",
    )
    sc = p.add_argument_group("scheduler")
    sc.add_argument("--scheduler", choices=("asha", "fifo"), default="asha", help="(default %(default)s)")
    sc.add_argument(
        "--grace-period",
        type=int,
        default=1,
        help="ASHA: evaluations before a trial may be stopped (default %(default)s)",
    )
    sc.add_argument(
        "--reduction-factor",
        type=float,
        default=2.0,
        help="ASHA: keep 1/this at each rung (default %(default)s)",
    )
    sc.add_argument(
        "--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial (default %(default)s)"
    )
    sc.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="retries of a failed trial from its checkpoint (default %(default)s)",
    )
    sc.add_argument(
        "--name",
        default=None,
        help="sweep name (default: derived from the parameters, so re-running continues)",
    )
    p.add_argument("--store", default=None, help="store root (default $CHARLM_STORE or ~/.charlm/store)")
    tr = p.add_argument_group("tracking (MLflow; MLFLOW_TRACKING_URI for a server)")
    tr.add_argument(
        "--register",
        default=None,
        metavar="NAME",
        help="register the winner's best checkpoint as a new version of NAME",
    )
    tr.add_argument("--experiment", default=None, help="MLflow experiment (default charlm)")
    tr.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    tr.add_argument("--no-track", action="store_true", help="do not record the sweep in MLflow")
    add_config_flags(
        p,
        TrainConfig,
        group_titles={
            "run length": "run length per trial (the first limit reached stops; default --max-epochs 10)"
        },
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
    p.set_defaults(func=_run)
