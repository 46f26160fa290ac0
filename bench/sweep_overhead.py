"""A sweep's overhead per trial: what `charlm sweep` spends on a trial beyond training it (Tune's
trial start-up in a Ray worker, data shipping, the MLflow child run, a report + checkpoint per
evaluation, ending the runs, the comparison), measured against the same configs trained by the
plain loop in this process (the reference, in the same run).

The sweep runs its trials one at a time (--cpus-per-trial = every CPU of the local Ray, FIFO), so
its wall time is the trials' sum: overhead per trial = (sweep wall - reference wall) / trials.
Ray's own start-up (once per process, not per trial) is reported apart. Target: <= 5 s per trial.
Prints one JSON object with the machine and its load average.

    .venv/bin/python bench/sweep_overhead.py [--trials 4] [--steps 100] [--eval-every 25]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from charlm.capability import machine_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--no-track", action="store_true", help="without MLflow (Tune's own overhead)")
    a = p.parse_args()
    for k, v in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "DO_NOT_TRACK": "1",
    }.items():
        os.environ.setdefault(k, v)

    import torch

    from charlm.config import TrainConfig
    from charlm.distributed import ensure_ray
    from charlm.sweep import grid_space, run_sweep
    from charlm.train import train
    from charlm.trainingdata import load_training_data

    tmp = Path(tempfile.mkdtemp(prefix="charlm-bench-sweep-"))
    corpus = tmp / "corpus.txt"
    corpus.write_text(Path(json.__file__).read_text() * 10)
    base = TrainConfig(hidden_size=64, embed_size=16, num_layers=1, seq_len=50, batch_size=16,
                       max_steps=a.steps, eval_every=a.eval_every, log_every=10, precision="fp32",
                       warmup_steps=0)  # fmt: skip
    seeds = list(range(1, a.trials + 1))
    space = grid_space([f"seed={','.join(map(str, seeds))}"], base)

    t0 = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - t0
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))

    # the reference: each config in the plain loop, one at a time, with every CPU
    torch.set_num_threads(max(1, int(cpus)))
    vocab, splits, fp, label = load_training_data(str(corpus), base.val_frac, base.test_frac)
    t0 = time.perf_counter()
    for s in seeds:
        train(base.replace(seed=s), vocab, splits, device="cpu", corpus_fingerprint=fp, corpus_name=label)
    reference = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = run_sweep(str(corpus), base, space, scheduler="fifo", store=str(tmp / "store"),
                        track=not a.no_track, tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                        cpus_per_trial=cpus)  # fmt: skip
    sweep = time.perf_counter() - t0
    ray.shutdown()
    per_trial = (sweep - reference) / a.trials
    print(
        json.dumps(
            {
                "bench": "sweep_overhead",
                "trials": a.trials,
                "steps_per_trial": a.steps,
                "reports_per_trial": -(-a.steps // a.eval_every),
                "tracked": not a.no_track,
                "sweep_wall_s": round(sweep, 2),
                "reference_wall_s": round(reference, 2),
                "ratio_sweep_to_reference": round(sweep / reference, 3),
                "overhead_per_trial_s": round(per_trial, 2),
                "target_per_trial_s": 5.0,
                "within_target": per_trial <= 5.0,
                "ray_start_s": round(ray_start, 2),
                "trials_completed": sum(t["completed"] for t in summary["trials"]),
                "load_average": os.getloadavg(),
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
