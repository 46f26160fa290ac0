"""Ray Train scaling on this machine: chars/s of 1 and 2 DDP workers vs one plain process at the
same global batch, and the fixed start-up cost of a fit.

All three run charlm's one training loop (`charlm.train.train`) on the same random data:
  plain   train() in this process, batch G, all cores' threads
  ray_1   one Ray worker, batch G, all cores
  ray_2   two Ray workers (gloo DDP), batch G/2 each = global G, cores split between them
All three are timed the same way, as bench/train_throughput.py times its two sides: wall clock
over whole optimizer steps, from the end of step --warmup to the end of step --warmup + --steps,
read by a callback at the loop's step boundaries (on rank 0 in DDP). Everything a step does is
inside the window, the per-step collectives of DDP included: the gradients' all-reduce, the stop
check's two on every step and the loss's on every logged one. Evaluation and Ray's
start-up are outside it. The start-up cost is the wall time of a fit minus the time its steps
and evaluations took: measured on a tiny model (2 steps) for 1 and 2 workers, with the Ray
session already up; ray.init itself is reported apart.

    python bench/ray_scaling.py [--hidden-size 512 --num-layers 2 --global-batch 64 --seq-len 100]
    infra/ray-cluster.sh start 2 && eval "$(infra/ray-cluster.sh env)" && python bench/ray_scaling.py --cluster
Prints one JSON object, with where it ran (`machine`: the driver's; each variant's torch threads
beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial

import numpy as np
import torch
import trainbench

from charlm import capability
from charlm.config import TrainConfig
from charlm.train import Run, train

V = 65


class StepClock(trainbench.StepClock):
    """trainbench's clock (no device to synchronise on the CPU), written to `path` on rank 0 at the
    end when given (the Ray workers' way back).

    In DDP, train() asks should_stop after the whole step (update, logging and its all-reduce), so
    two calls enclose exactly one iteration of its loop, the stop check's own all-reduces included.
    Every rank stops at the same step, so the ranks agree."""

    def __init__(self, warmup: int, steps: int, path: str | None = None, allreduce_reps: int = 0) -> None:
        super().__init__(warmup, steps)
        self.path = path
        self.allreduce_reps = allreduce_reps

    def on_end(self, run: Run, result: dict) -> None:
        allreduce = _allreduce_seconds(run, self.allreduce_reps) if self.allreduce_reps else None
        if self.path and run.dist.rank == 0:
            with open(self.path, "w") as f:
                json.dump(
                    {
                        "seconds": self.seconds,
                        "steps": self.steps,
                        "chars_per_step": run.chars_per_step,
                        "threads": torch.get_num_threads(),
                        "allreduce": allreduce,
                    },
                    f,
                )


def _allreduce_seconds(run: Run, reps: int) -> dict | None:
    """After training, on every rank: the wall time of one all-reduce of a float32 tensor the size
    of the gradients (what DDP all-reduces per step, in its buckets), median of `reps`, with its
    size. None with one worker (nothing to reduce)."""
    import torch.distributed as tdist

    if run.dist.world_size == 1:
        return None
    n = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    t = torch.ones(n, dtype=torch.float32)
    tdist.all_reduce(t)  # warm-up: the first one sets up the connections
    times = []
    for _ in range(reps):
        tdist.barrier()
        t0 = time.perf_counter()
        tdist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    return {"params": n, "bytes": 4 * n, "seconds_median": statistics.median(times), "reps": reps}


def _clock_factory(warmup: int, steps: int, path: str, allreduce_reps: int, rank: int, world: int) -> list:
    return [StepClock(warmup, steps, path, allreduce_reps)]


def make_corpus(path: str, n: int) -> None:
    rng = np.random.default_rng(0)
    alphabet = np.array([chr(32 + i) for i in range(V - 1)] + ["\n"])
    with open(path, "w") as f:
        f.write("".join(alphabet[rng.integers(0, V, size=n)]))


def config(args, batch: int, steps: int) -> TrainConfig:
    return TrainConfig(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        embed_size=64,
        dropout=0.5,
        weight_drop=0.0,
        optimizer="adam",
        batch_size=batch,
        seq_len=args.seq_len,
        max_steps=steps + 1,  # never reached: StepClock stops the run at step `steps`
        eval_every=10**9,
        eval_max_batches=1,
        precision=args.precision,
        val_frac=0.1,
        test_frac=0.0,
    )


def plain(args, corpus: str) -> float:
    from charlm.trainingdata import load_training_data

    cfg = config(args, args.global_batch, args.warmup + args.steps)
    vocab, splits, fp, label = load_training_data(corpus, cfg.val_frac, cfg.test_frac)
    clock = StepClock(args.warmup, args.steps)
    train(cfg, vocab, splits, callbacks=[clock], device="cpu", corpus_fingerprint=fp, corpus_name=label)
    return args.global_batch * args.seq_len * args.steps / clock.seconds


def ray_run(
    args, corpus: str, store: str, workers: int, tag: str, cpus: float | None = None, allreduce_reps: int = 0
) -> dict:
    from charlm.distributed import train_distributed

    out = os.path.join(store, f"timer-{tag}.json")
    cfg = config(args, args.global_batch // workers, args.warmup + args.steps)
    t0 = time.perf_counter()
    summary = train_distributed(
        cfg,
        corpus,
        store=store,
        workers=workers,
        use_gpu=False,
        run_name=f"bench-{tag}",
        max_failures=0,
        cpus_per_worker=cpus,
        rank_callbacks=partial(_clock_factory, args.warmup, args.steps, out, allreduce_reps),
    )
    wall = time.perf_counter() - t0
    with open(out) as f:
        t = json.load(f)
    return {
        "chars_per_s": t["chars_per_step"] * t["steps"] / t["seconds"],
        "step_s": t["seconds"] / t["steps"],
        "workers_chars_per_s": summary["workers_chars_per_s"],
        "fit_seconds": summary["fit_seconds"],
        "wall_s": wall,
        "threads": t["threads"],
        "allreduce": t.get("allreduce"),
        "nodes": summary["attempts"][-1].get("nodes") if summary.get("attempts") else None,
    }


def startup(args, corpus: str, store: str, workers: int, tag: str, cpus: float | None = None) -> dict:
    """Wall time of a fit of a tiny model (2 steps) minus its training and evaluation time."""
    from charlm.distributed import train_distributed

    cfg = TrainConfig(
        hidden_size=16, num_layers=1, embed_size=8, batch_size=2, seq_len=16, max_steps=2, eval_max_batches=1
    )
    t0 = time.perf_counter()
    s = train_distributed(
        cfg,
        corpus,
        store=store,
        workers=workers,
        use_gpu=False,
        run_name=f"startup-{tag}",
        cpus_per_worker=cpus,
    )
    wall = time.perf_counter() - t0
    return {"fit_wall_s": wall, "fit_s": s["fit_seconds"], "steps_s": s["train_seconds"]}


def cluster(args, corpus: str, work: str) -> dict:
    """--cluster: on the cluster at RAY_ADDRESS (infra/ray-cluster.sh start 2: a head and two worker
    nodes, 1 CPU each): 1 worker at batch G on one node against 2 workers at G/2 each on two nodes,
    rounds alternating; the all-reduce of the gradients' size between the two nodes' workers;
    where the workers ran; the start-up of a tiny fit for 1 and 2 workers."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    store = os.path.join(work, "store")
    results: dict[str, list] = {"ray_1": [], "ray_2": []}
    runs: dict[str, list] = {"ray_1": [], "ray_2": []}
    for r in range(args.rounds):
        for w in (1, 2):
            one = ray_run(args, corpus, store, w, f"c{w}-{r}", cpus=1.0, allreduce_reps=10 if w == 2 else 0)
            results[f"ray_{w}"].append(one["chars_per_s"])
            runs[f"ray_{w}"].append(one)
    med = {k: statistics.median(v) for k, v in results.items()}
    two = runs["ray_2"]
    ar = [x["allreduce"]["seconds_median"] for x in two if x["allreduce"]]
    step2 = statistics.median(x["step_s"] for x in two)
    starts = {
        f"{w}_workers": [
            startup(args, corpus, store, w, f"c{w}-{i}", cpus=1.0) for i in range(args.startup_fits)
        ]
        for w in (1, 2)
    }
    return {
        "cluster": {
            "address": os.environ.get("RAY_ADDRESS"),
            "nodes": [
                {
                    "node_id": n["NodeID"][:12],
                    "ip": n["NodeManagerAddress"],
                    "cpus": n["Resources"].get("CPU", 0),
                }
                for n in nodes
            ],
        },
        "chars_per_s": {k: round(v) for k, v in med.items()},
        "all_rounds": {k: [round(x) for x in v] for k, v in results.items()},
        "ray_2_workers_chars_per_s_last_log": [x["workers_chars_per_s"] for x in two],
        "ratio_ray_2_vs_ray_1": round(med["ray_2"] / med["ray_1"], 3),
        "scaling_efficiency_2_nodes": round(med["ray_2"] / (2 * med["ray_1"]), 3),
        "step_s": {k: round(statistics.median(x["step_s"] for x in v), 4) for k, v in runs.items()},
        "allreduce": {
            "params": two[0]["allreduce"]["params"] if two[0]["allreduce"] else None,
            "bytes": two[0]["allreduce"]["bytes"] if two[0]["allreduce"] else None,
            "seconds_median": round(statistics.median(ar), 5) if ar else None,
            "share_of_ray_2_step": round(statistics.median(ar) / step2, 3) if ar else None,
            "how": "one all-reduce of a float32 tensor of the gradients' size, after training, median of 10",
        },
        "placement": {k: [[n[:12] for n in (x["nodes"] or [])] for x in v] for k, v in runs.items()},
        "startup": {
            k: {
                "fit_wall_s": round(min(x["fit_wall_s"] for x in v), 2),
                "overhead_s": round(min(x["fit_s"] - x["steps_s"] for x in v), 2),
            }
            for k, v in starts.items()
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=64, help="streams per step over all workers")
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--precision", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--startup-fits", type=int, default=2, help="tiny fits per worker count (best is kept)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds to wait after ray.init")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="measure on the cluster at RAY_ADDRESS (infra/ray-cluster.sh start 2): 1 vs 2 workers on 1-CPU nodes",
    )
    args = p.parse_args()
    if args.cluster and not os.environ.get("RAY_ADDRESS"):
        p.error(
            '--cluster needs RAY_ADDRESS: eval "$(infra/ray-cluster.sh env)" after infra/ray-cluster.sh start 2'
        )
    if args.global_batch % 2:
        p.error("--global-batch must be even (it is split over 2 workers)")
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1 or args.startup_fits < 1:
        p.error("--warmup, --steps, --rounds and --startup-fits must be at least 1")

    from charlm.distributed import ensure_ray

    work = tempfile.mkdtemp(prefix="charlm-bench-ray-")
    corpus = os.path.join(work, "corpus.txt")
    # enough for the timed runs' train and val splits, and at least the start-up fits' (5% val)
    need = int(args.global_batch * args.seq_len * (args.warmup + args.steps + 12) / 0.85)
    make_corpus(corpus, max(need, 10_000))
    t0 = time.perf_counter()
    ensure_ray()
    ray_init_s = time.perf_counter() - t0
    # the workers unpickle StepClock, whose base is trainbench's: ship that module by value, so that
    # they need not find bench/ (where `python bench/ray_scaling.py` finds it) on their sys.path
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(trainbench)
    time.sleep(args.settle)  # Ray pre-starts idle worker processes after init: let their imports finish
    if args.cluster:
        report = cluster(args, corpus, work)
        print(
            json.dumps(
                {
                    "bench": "ray_scaling_cluster",
                    "machine": capability.machine_info(),
                    "cores": len(os.sched_getaffinity(0)),
                    "timing": f"wall clock over whole optimizer steps {args.warmup + 1}..{args.warmup + args.steps}",
                    "config": {
                        k: getattr(args, k)
                        for k in (
                            "hidden_size",
                            "num_layers",
                            "global_batch",
                            "seq_len",
                            "precision",
                            "steps",
                        )
                    },
                    "ray_init_s": round(ray_init_s, 2),
                    **report,
                },
                indent=2,
            )
        )
        return

    results: dict[str, list] = {"plain": [], "ray_1": [], "ray_2": []}
    per_worker: list = []
    threads = {"plain": torch.get_num_threads()}
    for r in range(args.rounds):  # alternate so that drift on a shared machine hits all alike
        results["plain"].append(plain(args, corpus))
        one = ray_run(args, corpus, os.path.join(work, "store"), 1, f"1-{r}")
        results["ray_1"].append(one["chars_per_s"])
        two = ray_run(args, corpus, os.path.join(work, "store"), 2, f"2-{r}")
        results["ray_2"].append(two["chars_per_s"])
        per_worker.append(two["workers_chars_per_s"])
        threads["ray_1"], threads["ray_2"] = one["threads"], two["threads"]
    starts = {
        f"{w}_workers": [
            startup(args, corpus, os.path.join(work, "store"), w, f"{w}-{i}")
            for i in range(args.startup_fits)
        ]
        for w in (1, 2)
    }
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        json.dumps(
            {
                "bench": "ray_scaling",
                "machine": capability.machine_info(),
                "cores": len(os.sched_getaffinity(0)),
                "torch_threads_per_worker": threads,
                "timing": (
                    f"wall clock over whole optimizer steps {args.warmup + 1}..{args.warmup + args.steps}, "
                    "all three variants alike (DDP's per-step collectives included)"
                ),
                "config": {
                    k: getattr(args, k)
                    for k in (
                        "hidden_size",
                        "num_layers",
                        "global_batch",
                        "seq_len",
                        "precision",
                        "steps",
                        "warmup",
                        "rounds",
                    )
                },
                "chars_per_s": {k: round(v) for k, v in med.items()},
                "all_rounds": {k: [round(x) for x in v] for k, v in results.items()},
                # charlm's own per-rank log figure (its in-loop step time): shows the lockstep
                "ray_2_workers_chars_per_s_last_log": per_worker,
                "ratio_ray_1_vs_plain": round(med["ray_1"] / med["plain"], 3),
                "ratio_ray_2_vs_plain": round(med["ray_2"] / med["plain"], 3),
                "ray_init_s": round(ray_init_s, 2),
                "startup": {
                    k: {
                        "fit_wall_s": round(min(x["fit_wall_s"] for x in v), 2),
                        "overhead_s": round(min(x["fit_s"] - x["steps_s"] for x in v), 2),
                        "all": [{kk: round(vv, 2) for kk, vv in x.items()} for x in v],
                    }
                    for k, v in starts.items()
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
