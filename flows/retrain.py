"""Prefect flow `retrain`, for a schedule: run the pipeline only when the corpus changed.

It lists the corpus prefix (all pages, sorted) and compares the objects' URLs, sizes and ETags
(mtimes for local folders) with the sources recorded in the manifest of the newest dataset
ingested under the same name. Nothing changed: it returns at once, without ingesting, starting
Ray or touching MLflow. A new, removed or changed object: it runs the pipeline, which ingests a
new dataset version, trains, registers, evaluates against the champion, promotes if better and
generates.

    python -m flows.retrain s3://corpora/shakespeare/ --name shakespeare
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from charlm import storage


def _key(objects: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    return sorted((o["url"], int(o["size"]), str(o["version"])) for o in objects)


@task(name="detect-changes", cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10])
def detect_changes(prefix: str, dataset_name: str, store: str | None) -> dict[str, Any]:
    from charlm.datasets import list_datasets

    listed = [o.to_dict() for o in storage.list_objects(prefix)]
    mine = [d for d in list_datasets(store) if d.get("name") == dataset_name and "error" not in d]
    if not mine:
        return {"changed": True, "reason": f"no dataset named {dataset_name!r} yet", "objects": len(listed)}
    last = mine[-1]
    manifest = storage.read_bytes(storage.join(last["url"], "manifest.json"))
    import json

    recorded = json.loads(manifest)["sources"]["objects"]
    old, new = _key(recorded), _key(listed)
    if old == new:
        return {
            "changed": False,
            "reason": "listing and ETags match",
            "dataset": last["id"],
            "objects": len(listed),
        }
    old_urls = {u: (s, v) for u, s, v in old}
    new_urls = {u: (s, v) for u, s, v in new}
    added = sorted(set(new_urls) - set(old_urls))
    removed = sorted(set(old_urls) - set(new_urls))
    changed = sorted(u for u in set(new_urls) & set(old_urls) if new_urls[u] != old_urls[u])
    return {
        "changed": True,
        "reason": f"{len(added)} new, {len(changed)} changed, {len(removed)} removed object(s)",
        "dataset": last["id"],
        "added": added[:20],
        "modified": changed[:20],
        "removed": removed[:20],
        "objects": len(listed),
    }


@flow(name="retrain", log_prints=True)
def retrain(
    prefix: str,
    name: str,
    config: dict[str, Any] | None = None,
    scaling: dict[str, Any] | None = None,
    store: str | None = None,
    dataset_name: str | None = None,
    margin: float = 0.01,
    prompts: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Check `prefix` for new or changed objects; run the pipeline for model `name` if any."""
    ds_name = dataset_name or name
    change = detect_changes(prefix, ds_name, store)
    log = get_run_logger()
    if not change["changed"]:
        log.info("%s: nothing changed since dataset %s; not retraining", prefix, change.get("dataset"))
        return {"ran": False, **change}
    log.info("%s: %s; running the pipeline", prefix, change["reason"])
    from flows.pipeline import pipeline

    result = pipeline(
        [prefix],
        name,
        config=config,
        scaling=scaling,
        store=store,
        dataset_name=ds_name,
        margin=margin,
        prompts=prompts,
        tracking_uri=tracking_uri,
    )
    return {"ran": True, **change, "pipeline": result}


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix")
    p.add_argument("--name", required=True)
    p.add_argument("--store")
    a = p.parse_args()
    print(json.dumps(retrain(a.prefix, a.name, store=a.store), default=str))
