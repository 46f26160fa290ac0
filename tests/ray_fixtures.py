"""Helpers for the Ray tests that must run inside Ray workers.

Ray workers cannot import this folder (it is not a package), so the module registers itself to
be pickled by value: factories built here (functools.partial of the functions below) travel to
the workers whole.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from typing import Any

import numpy as np

from charlm.train import Callback

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
    "and",
    "pack",
    "my",
    "box",
    "with",
    "five",
    "dozen",
    "liquor",
    "jugs",
]


def make_corpus(n_chars: int = 40_000, seed: int = 0) -> str:
    """Deterministic, learnable text: random lines of words from a small fixed list."""
    rng = np.random.default_rng(seed)
    lines, n = [], 0
    while n < n_chars:
        line = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(4, 12))))
        lines.append(line.capitalize() + ".")
        n += len(lines[-1]) + 1
    return "\n".join(lines)[:n_chars] + "\n"


class DieOnce(Callback):
    """SIGKILLs its own worker process on `rank` right after step `step`, the first time only
    (a marker file remembers that it happened, across restarts).

    Before dying it waits until Ray has committed every checkpoint reported so far: otherwise a
    death a few milliseconds after a report races the controller's registration of it, and the run
    (correctly, but unpredictably for a test) resumes from the checkpoint before."""

    def __init__(self, marker: str, rank: int, step: int) -> None:
        self.marker, self.rank, self.step = marker, rank, step

    def should_stop(self, run) -> bool:
        if run.dist.rank == self.rank and run.step == self.step and not os.path.exists(self.marker):
            import ray.train
            from ray.train.v2.api.report_config import CheckpointConsistencyMode

            ray.train.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED, timeout_s=60)
            with open(self.marker, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return False


class SlowSteps(Callback):
    """Sleeps after every step (gives a test time to kill the driver mid-run)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def should_stop(self, run) -> bool:
        time.sleep(self.seconds)
        return False


class _BatchLog(Callback):
    def __init__(self, path: str, log: list) -> None:
        self.path, self.log = path, log

    def on_end(self, run, result) -> None:
        np.save(self.path, np.stack(self.log) if self.log else np.zeros((0,), np.int64))


def _recording_batcher(base: type, log: list) -> type:
    class RecordingBatcher(base):
        def epoch(self, epoch: int, start: int = 0):
            for x, y in super().epoch(epoch, start):
                if self.seed is not None:  # training batches only (evaluation passes seed=None)
                    log.append(x.numpy().copy())
                yield x, y

    return RecordingBatcher


def _record_batches(out_dir: str, rank: int, world: int) -> list[Any]:
    """Makes this worker's training loop log every input batch it trains on, saved to
    out_dir/rank<r>.npy at the end (shape (steps, B, T))."""
    import charlm.train

    log: list = []
    charlm.train.StreamBatcher = _recording_batcher(charlm.train.StreamBatcher, log)
    return [_BatchLog(os.path.join(out_dir, f"rank{rank}.npy"), log)]


def _die_once(marker: str, die_rank: int, step: int, rank: int, world: int) -> list[Any]:
    return [DieOnce(marker, die_rank, step)]


def _slow(seconds: float, rank: int, world: int) -> list[Any]:
    return [SlowSteps(seconds)]


def record_batches(out_dir: str):
    return functools.partial(_record_batches, out_dir)


def die_once(marker: str, rank: int, step: int):
    return functools.partial(_die_once, marker, rank, step)


def slow_steps(seconds: float):
    return functools.partial(_slow, seconds)


def _register() -> None:
    try:
        from ray import cloudpickle
    except ImportError:
        return
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


_register()
