"""Batch generation on Ray actors: charlm.genjob's executor, one actor per shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from charlm.distributed.errors import DistributedTrainingError, first_line
from charlm.distributed.session import ensure_ray, resources


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

        def run(self, records: list, cfg: Any) -> list[dict]:
            from charlm.generate import generate_records

            return generate_records(self.sampler, records, cfg, self.label)

    return Generator


def generate_on_ray(
    ckpt: bytes, label: str, shards: list[list[Any]], cfg: Any, progress: Callable[[int], None]
):
    """charlm.genjob executor: one Ray actor per shard (a GPU each when the cluster has one per
    actor), each loading the model once and generating its shard cfg.batch_size streams at a time.
    Returns the shards' records in order; progress(n) is called as batches finish."""
    import ray

    ensure_ray()
    use_gpu, cpus, threads = resources(len(shards), None, None)
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
            pending[actor.run.remote(part, cfg)] = (si, bi)
    results: dict[tuple[int, int], list[dict]] = {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            si, bi = pending.pop(done[0])
            try:
                results[(si, bi)] = ray.get(done[0])
            except Exception as e:
                raise DistributedTrainingError(f"generation actor {si} failed: {first_line(e)}") from e
            progress(sum(1 for r in results[(si, bi)] if r["error"] is None))
    finally:
        for a in actors:
            ray.kill(a)
    return [
        [r for bi in sorted(b for s, b in results if s == si) for r in results[(si, bi)]]
        for si in range(len(shards))
    ]
