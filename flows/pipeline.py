"""Prefect flow `pipeline`: corpus -> dataset -> trained run (Ray) -> registered version ->
evaluated against the champion -> promoted if better -> a generated sample set.

Each stage is its own subflow (ingest-corpus, train-model, evaluate-and-promote, generate) with
the retries of its own tasks. Every stage is idempotent, so a failed pipeline re-run resumes:
- ingest: an unchanged corpus maps to the existing dataset id (no rewrite);
- train: the run name is derived from (dataset, config, workers): an unfinished run resumes from
  its last checkpoint, a finished one is not trained again;
- register: a version tagged with that run name already exists -> reused, no new version;
- evaluate/promote: compares again (cheap) and moves the alias only when better by the margin;
- generate: the output folder is derived from (model version, prompts, config): a finished job
  is returned as it is.
Ray is started in the flow's main thread (subflows and tasks are called, never .submit()).

    python -m flows.pipeline CORPUS... --name NAME [--workers 2] [--max-steps 300]
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from charlm import storage
from charlm.config import TrainConfig
from charlm.generate import GenerateConfig

RUN_TAG = "charlm_train_run"
DEFAULT_PROMPTS = ["", "The ", "\\n", "A"]


@task(name="find-trained-version", cache_policy=NONE)
def find_trained_version(name: str, run_name: str, tracking_uri: str | None, store: str | None) -> int | None:
    from charlm import tracking

    return tracking.find_version(name, RUN_TAG, run_name, tracking_uri=tracking_uri, store=store)


@task(name="train-and-register", cache_policy=NONE)
def train_and_register(
    dataset: str,
    config: dict[str, Any],
    scaling: dict[str, Any],
    name: str,
    run_name: str,
    tracking_uri: str | None,
    store: str | None,
    progress: bool = False,
) -> dict[str, Any]:
    from charlm import tracking
    from charlm.distributed import train_distributed
    from charlm.refs import resolve_data

    cfg = TrainConfig.from_dict(config)
    data = resolve_data(dataset, store)  # once, for the training and the run's lineage

    def run_fn(tracked: tracking.TrackedRun) -> dict[str, Any]:
        return train_distributed(
            cfg,
            data,
            store=store,
            run_name=None,  # derived from the parameters: re-running resumes or returns it
            on_run_folder=tracked.bind_folder,  # a rerun continues the MLflow run recorded there
            quiet=not progress,
            **scaling,
        )

    summary = tracking.tracked_training(
        run_fn,
        corpus=data,
        store=store,
        register=name,
        tracking_uri=tracking_uri,
        run_name=run_name,
        params={k: v for k, v in scaling.items() if k in ("workers", "use_gpu")},
        register_tags={RUN_TAG: run_name},
    )
    reg = summary["mlflow"]["registered"]
    return {
        "version": int(reg["version"]),
        "model_uri": reg["model_uri"],
        "mlflow_run_id": summary["mlflow"]["run_id"],
        "run_url": summary.get("run_url"),
        "best_val_bpc": summary.get("best_val_bpc"),
        "steps": summary.get("steps"),
        "chars_per_s": summary.get("chars_per_s"),
        "already_finished": bool(summary.get("already_finished")),
    }


@task(name="default-prompts", cache_policy=NONE)
def default_prompts(store: str | None) -> str:
    url = storage.Store.at(store).samples("default-prompts.txt")
    if not storage.exists(url):
        storage.write_text_atomic(url, "\n".join(DEFAULT_PROMPTS) + "\n")
    return url


@flow(name="pipeline", log_prints=True)
def pipeline(
    sources: list[str],
    name: str,
    config: dict[str, Any] | None = None,
    scaling: dict[str, Any] | None = None,
    store: str | None = None,
    dataset_name: str | None = None,
    ingest_options: dict[str, Any] | None = None,
    margin: float = 0.01,
    alias: str = "champion",
    prompts: str | None = None,
    generate_config: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the whole chain for model `name`; returns small dicts from every stage. progress:
    training and generation progress bars on stderr (for the CLI)."""
    from charlm.distributed import derive_run_name
    from flows.evaluate import evaluate_and_promote
    from flows.generate import default_out, generate
    from flows.ingest import ingest_corpus

    log = get_run_logger()
    cfg = TrainConfig.from_dict(config) if config else TrainConfig(max_epochs=1)
    scaling = dict(scaling or {"workers": 1})
    workers = int(scaling.setdefault("workers", 1))

    ds = ingest_corpus(list(sources), store, name=dataset_name or name, **(ingest_options or {}))
    run_name = derive_run_name(cfg, ds["id"], workers)
    version = find_trained_version(name, run_name, tracking_uri, store)
    if version is not None:
        log.info(
            "dataset %s already has version %s of %s trained with this config: not training",
            ds["id"],
            version,
            name,
        )
        trained = {"version": version, "skipped": True}
    else:
        trained = train_and_register(
            ds["id"], cfg.to_dict(), scaling, name, run_name, tracking_uri, store, progress
        )
        trained["skipped"] = False
    decision = evaluate_and_promote(
        name, trained["version"], alias=alias, margin=margin, tracking_uri=tracking_uri, store=store
    )

    gcfg = GenerateConfig.from_dict(generate_config or {"num_samples": 2})
    prompts = prompts or default_prompts(store)
    model = f"models:/{name}/{trained['version']}"
    out = default_out(model, prompts, gcfg.to_dict(), store)
    from charlm.genjob import read_job

    done = read_job(out)
    samples = (
        {"out": out, "records": done["records"], "reused": True}
        if done is not None
        else generate(
            model, prompts, out, gcfg.to_dict(), workers, store, progress=progress, tracking_uri=tracking_uri
        )
    )
    return {
        "dataset": {"id": ds["id"], "url": ds["url"], "reused": ds.get("reused", False)},
        "run_name": run_name,
        "trained": trained,
        "decision": {
            k: decision.get(k)
            for k in (
                "decision",
                "promoted",
                "reason",
                "candidate",
                "champion",
                "candidate_bpc",
                "champion_bpc",
                "alias",
            )
        },
        "samples": samples,
    }


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+")
    p.add_argument("--name", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--store")
    a = p.parse_args()
    cfg = TrainConfig(max_steps=a.max_steps)
    print(
        json.dumps(pipeline(a.sources, a.name, cfg.to_dict(), {"workers": a.workers}, a.store), default=str)
    )
