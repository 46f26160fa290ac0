"""Batch generation jobs: prompts from a store URL -> JSONL parts + manifest in a store folder.

    <out>/part-00000.jsonl ... one per worker shard, records in global order
    <out>/manifest.json    written last: a reader treats a folder without it as absent

Generation runs through an executor: in-process for one worker, Ray actors (each loads the
model once) for several (charlm.distributed.generate_on_ray). Records are identical either way
(see charlm.generate).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from charlm import __version__, storage
from charlm.generate import GenerateConfig, Record, generate_records, parse_prompts, plan, shard, to_jsonl

MANIFEST = "manifest.json"
Executor = Callable[[bytes, str, list[list[Record]], GenerateConfig, Callable[[int], None]], list[list[dict]]]


class JobError(ValueError):
    pass


def local_executor(
    ckpt: bytes, label: str, shards: list[list[Record]], cfg: GenerateConfig, progress: Callable[[int], None]
) -> list[list[dict]]:
    from charlm.checkpoint import load_model
    from charlm.sample import Sampler

    model, vocab, _ = load_model(ckpt, name=label)
    batch = min(cfg.batch_size, max(len(s) for s in shards))
    sampler = Sampler(model, vocab, precision=cfg.precision, max_batch=batch)
    return [generate_records(sampler, s, cfg, label, on_batch=progress) for s in shards]


def read_job(out_url: str) -> dict[str, Any] | None:
    """The manifest of a finished job at out_url, or None when there is none (absent/unfinished)."""
    url = storage.join(out_url, MANIFEST)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def run_job(
    ckpt: bytes,
    model_label: str,
    prompts_url: str,
    out_url: str,
    cfg: GenerateConfig,
    *,
    workers: int = 1,
    executor: Executor | None = None,
    progress: Callable[[int, int], None] | None = None,
    model_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate num_samples per prompt; publish parts then the manifest. Returns the manifest."""
    if read_job(out_url) is not None:
        raise JobError(
            f"{out_url}: already holds a finished generation job (manifest.json); choose another --out"
        )
    prompts = parse_prompts(storage.read_bytes(prompts_url), storage.basename(prompts_url))
    records = plan(prompts, cfg.num_samples)
    shards = shard(records, workers)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], len(records))

    t0 = time.perf_counter()
    results = (executor or local_executor)(ckpt, model_label, shards, cfg, tick)
    seconds = time.perf_counter() - t0
    parts = []
    for i, recs in enumerate(results):
        name = f"part-{i:05d}.jsonl"
        storage.write_bytes_atomic(storage.join(out_url, name), to_jsonl(recs))
        parts.append({"file": name, "records": len(recs)})
    flat = [r for recs in results for r in recs]
    chars = sum(len(r["sample"] or "") for r in flat)
    manifest = {
        "format": "charlm.samples/1",
        "model": model_label,
        **({"model_info": model_info} if model_info else {}),
        "prompts": prompts_url,
        "num_prompts": len(prompts),
        "config": cfg.to_dict(),
        # what "auto" resolved to on the workers (int8 on VNNI CPUs, bf16 on GPUs, ...)
        "precisions": sorted({r["precision"] for r in flat}),
        "workers": len(shards),
        "records": len(flat),
        "errors": sum(1 for r in flat if r["error"]),
        "parts": parts,
        "chars": chars,
        "seconds": round(seconds, 3),
        "chars_per_s": round(chars / seconds, 1) if seconds > 0 else None,
        "charlm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_text_atomic(storage.join(out_url, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def read_records(out_url: str) -> list[dict]:
    """All records of a finished job, in order."""
    manifest = read_job(out_url)
    if manifest is None:
        raise JobError(f"{out_url}: no finished generation job (manifest.json missing)")
    out: list[dict] = []
    for part in manifest["parts"]:
        data = storage.read_bytes(storage.join(out_url, part["file"])).decode("utf-8")
        out.extend(json.loads(line) for line in data.splitlines() if line)
    return out


def summary_markdown(manifest: dict[str, Any], records: Sequence[dict], show: int = 5) -> str:
    """A short markdown report (a Prefect artifact): counts, speed, the first few samples."""
    lines = [
        f"# Generation job: {manifest['records']} records",
        "",
        f"- model: `{manifest['model']}`",
        f"- prompts: `{manifest['prompts']}` ({manifest['num_prompts']} prompts x {manifest['config']['num_samples']} samples)",
        f"- workers: {manifest['workers']}, {manifest['chars']:,} characters in {manifest['seconds']} s ({manifest['chars_per_s']} chars/s)",
        f"- records with errors: {manifest['errors']}",
        "",
        "| record | prompt | sample |",
        "|---|---|---|",
    ]
    for r in records[:show]:
        sample = (r["sample"] or f"ERROR: {r['error']}")[:120]
        cell = lambda s: s.replace("|", "\\|").replace("\n", "⏎")  # noqa: E731
        lines.append(f"| {r['record']} | {cell(r['prompt'])} | {cell(sample)} |")
    return "\n".join(lines) + "\n"
