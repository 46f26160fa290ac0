"""Prefect flow `ingest-corpus`: corpus objects -> a published, content-addressed dataset.

Wiring only (tasks, retries, caching, artifact); the work is in charlm.ingest:

    list-sources -> scan-objects (one task per batch, concurrent, cached) -> build-vocab
                 -> encode-and-publish -> markdown artifact

Tasks hand each other URLs and small dicts (object listings, per-object counts and digests); the
text itself is only ever streamed inside a task. Storage tasks retry with exponential backoff,
and only on transient storage errors (connection refused/reset, timeouts, throttling, 5xx);
policy errors (invalid UTF-8, binary object, empty corpus) fail at once.

A scan is cached by the batch's object URLs, sizes and ETags/mtimes plus the text policies, so an
unchanged corpus is not read again by a later flow run; publishing is a no-op when the dataset id
is already in the store. If an object changed without changing its listed size and ETag/mtime
(a cached scan is then stale), publishing notices the digest mismatch and the flow rescans once
without the cache.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from charlm import ingest, storage, storage_check
from charlm.ingest import Policies, SourceChangedError
from charlm.ingest.format import validate_name
from charlm.vocab import Vocab
from flows.retries import retry_if_transient

RETRIES = 3
RETRY_DELAY = exponential_backoff(backoff_factor=2)  # 2, 4, 8 s (+ jitter)
SCAN_CACHE_DAYS = 30


def scan_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Content of the batch as the store sees it (URL, size, ETag/mtime) + text policies."""
    key = {
        "scan_version": ingest.SCAN_VERSION,
        "objects": [storage.ObjectInfo.from_dict(o).to_dict() for o in parameters["objects"]],
        "policies": Policies.from_dict(parameters["policies"]).text_key(),
    }
    return "charlm-scan-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


_storage_task = {
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAY,
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": retry_if_transient,
}


@task(name="list-sources", cache_policy=NONE, **_storage_task)
def list_sources(sources: list[str]) -> list[dict[str, Any]]:
    objects = ingest.list_sources(sources)
    get_run_logger().info("%d objects, %d bytes", len(objects), sum(o.size for o in objects))
    return [o.to_dict() for o in objects]


@task(
    name="scan-objects",
    cache_key_fn=scan_cache_key,
    cache_expiration=timedelta(days=SCAN_CACHE_DAYS),
    persist_result=True,
    **_storage_task,
)
def scan_objects(objects: list[dict[str, Any]], policies: dict[str, Any]) -> list[dict[str, Any]]:
    scans = ingest.scan_objects(objects, Policies.from_dict(policies))
    logger = get_run_logger()
    for s in scans:
        if not s["chars"]:
            logger.warning("%s: empty object skipped", s["url"])
        if s["replaced"]:
            logger.warning("%s: %d invalid UTF-8 sequence(s) replaced", s["url"], s["replaced"])
    return scans


@task(name="build-vocab", cache_policy=NONE)
def build_vocab(scans: list[dict[str, Any]], policies: dict[str, Any]) -> dict[str, Any]:
    ingest.check_scans(scans)  # EmptyCorpusError when nothing is left
    vocab = ingest.build_vocab(scans)
    did = ingest.dataset_id(Policies.from_dict(policies), scans)
    get_run_logger().info("dataset %s: vocab of %d characters", did, len(vocab))
    return {"id": did, "vocab": vocab.to_dict()}


@task(name="encode-and-publish", cache_policy=NONE, **_storage_task)
def encode_and_publish(
    scans: list[dict[str, Any]],
    policies: dict[str, Any],
    vocab: dict[str, Any],
    store: str,
    name: str | None,
    requested: list[str],
) -> dict[str, Any]:
    return ingest.publish(
        scans,
        Policies.from_dict(policies),
        store,
        name=name,
        requested=requested,
        vocab=Vocab.from_dict(vocab),
    )


@task(name="summarize-dataset", cache_policy=NONE, **_storage_task)
def summarize(url: str, reused: bool) -> str:
    return ingest.dataset_summary(url, reused=reused)


def _scan_all(
    batches: list[list[dict[str, Any]]], pol: dict[str, Any], refresh: bool
) -> list[dict[str, Any]]:
    runner = scan_objects.with_options(refresh_cache=True) if refresh else scan_objects
    futures = [runner.submit(b, pol) for b in batches]
    return [s for f in futures for s in f.result()]


# One scan task at a time: a scan is CPU-bound under the GIL (its I/O is already overlapped by a
# read-ahead thread and concurrent fetches of small objects), and two at once ran 2x slower.
@flow(name="ingest-corpus", task_runner=ThreadPoolTaskRunner(max_workers=1))
def ingest_corpus(
    sources: list[str],
    store: str | None = None,
    name: str | None = None,
    newlines: str = "lf",
    invalid: str = "strict",
    normalize: str | None = None,
    val_frac: float = 0.05,
    test_frac: float = 0.05,
) -> dict[str, Any]:
    """Ingest objects (URLs, prefixes, globs) into <store>/datasets/<id>/; returns a summary dict."""
    if name is not None:
        validate_name(name)  # a name that could read as an id is refused before any work
    policies = Policies(newlines, invalid, normalize, val_frac, test_frac)
    pol = policies.to_dict()
    root = storage_check.check_ingest(sources, store)  # fails fast, before any task retries
    objects = list_sources(list(sources))
    batches = [
        [o.to_dict() for o in b]
        for b in ingest.batch_objects([storage.ObjectInfo.from_dict(o) for o in objects])
    ]
    scans = _scan_all(batches, pol, refresh=False)
    built = build_vocab(scans, pol)
    try:
        result = encode_and_publish(scans, pol, built["vocab"], root, name, list(sources))
    except SourceChangedError as e:
        get_run_logger().warning("%s; scanning again without the cache", e)
        scans = _scan_all(batches, pol, refresh=True)
        built = build_vocab(scans, pol)
        result = encode_and_publish(scans, pol, built["vocab"], root, name, list(sources))
    create_markdown_artifact(
        key=f"dataset-{result['id'][:16]}",
        markdown=summarize(result["url"], result["reused"]),
        description=f"charlm dataset {result['id']}",
    )
    return result
