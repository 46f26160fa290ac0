"""Prefect flow `generate`: a model + a prompts file in the store -> a published samples job.

Wiring only: charlm.genjob does the work (charlm.distributed.generate_on_ray spreads it over
Ray actors when workers > 1). The job task runs in the flow's main thread (called, never
.submit()), because Ray's core processes die with the thread that started them.

    python -m flows.generate MODEL PROMPTS_URL [--out URL] [--workers 2]
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from charlm import storage
from charlm.generate import GenerateConfig


def default_out(model: str, prompts: str, config: dict[str, Any], store: str | None) -> str:
    key = json.dumps({"model": model, "prompts": prompts, "config": config}, sort_keys=True)
    job = "gen-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return storage.Store.at(store).samples(job)


def _progress_printer():
    state = {"last": -1}

    def show(done: int, total: int) -> None:
        pct = int(100 * done / max(1, total))
        if pct != state["last"]:
            state["last"] = pct
            bar = "#" * (pct // 4) + "-" * (25 - pct // 4)
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\r[{bar}] {done}/{total} streams{end}")
            sys.stderr.flush()

    return show


@task(name="generate-job", cache_policy=NONE)
def generate_job(
    model: str,
    prompts: str,
    out: str,
    cfg: GenerateConfig,
    workers: int,
    store: str | None,
    progress: bool,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    from charlm import checkpoint
    from charlm.genjob import local_executor, run_job
    from charlm.tracking import load_checkpoint_ref

    ck, label = load_checkpoint_ref(model, tracking_uri=tracking_uri, store=store)
    executor = local_executor
    if workers > 1:
        from charlm.distributed import generate_on_ray

        executor = generate_on_ray
    info = {k: ck.get(k) for k in ("step", "best_val_loss", "corpus_fingerprint")}
    return run_job(
        checkpoint.to_bytes(ck),
        label,
        prompts,
        out,
        cfg,
        workers=workers,
        executor=executor,
        progress=_progress_printer() if progress else None,
        model_info=info,
    )


@flow(name="generate", log_prints=True)
def generate(
    model: str,
    prompts: str,
    out: str | None = None,
    config: dict[str, Any] | None = None,
    workers: int = 1,
    store: str | None = None,
    progress: bool = False,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Generate config.num_samples samples per prompt with `model` (models:/NAME@ALIAS,
    models:/NAME/VERSION, a checkpoint path/URL or a run folder) into `out` (default
    <store>/samples/gen-<hash of model, prompts, config>). Returns a small summary."""
    from charlm.genjob import read_records, summary_markdown

    cfg = GenerateConfig.from_dict(config or {})
    out = out or default_out(model, prompts, cfg.to_dict(), store)
    manifest = generate_job(model, prompts, out, cfg, workers, store, progress, tracking_uri)
    create_markdown_artifact(
        key="generation-summary",
        markdown=summary_markdown(manifest, read_records(out)),
        description=f"generation job {out}",
    )
    get_run_logger().info(
        "generated %d records (%d with errors) into %s at %s chars/s",
        manifest["records"],
        manifest["errors"],
        out,
        manifest["chars_per_s"],
    )
    return {
        "out": out,
        "model": manifest["model"],
        "records": manifest["records"],
        "errors": manifest["errors"],
        "workers": manifest["workers"],
        "chars": manifest["chars"],
        "chars_per_s": manifest["chars_per_s"],
        "manifest": storage.join(out, "manifest.json"),
    }


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("prompts")
    p.add_argument("--out")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--store")
    a = p.parse_args()
    print(json.dumps(generate(a.model, a.prompts, a.out, None, a.workers, a.store, progress=True)))
