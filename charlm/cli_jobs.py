"""`charlm generate` and `charlm pipeline`: CLI wiring for the batch-generation and end-to-end
flows (flows/generate.py, flows/pipeline.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _generate(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from charlm import capability
    from charlm.cli import sampling_from_args
    from charlm.generate import GenerateConfig

    if a.workers <= 1 or not os.environ.get("RAY_ADDRESS"):
        # the job runs on this machine: in-process on its CPU, or on local Ray actors (a GPU each
        # where it has them); on a cluster each actor's Sampler refuses it first
        gpu = a.workers > 1 and torch.cuda.is_available()
        capability.resolve(a.precision, "cuda" if gpu else "cpu", "sample")
    from charlm import storage, storage_check

    if a.out is None:
        storage_check.check_store(a.store)
    elif storage.is_local(a.out):
        storage_check.check_local_folder(a.out, "--out")
    from charlm import prefect_server

    prefect_server.ensure()
    from flows.generate import generate  # Prefect starts logging on import: after the checks

    cfg = GenerateConfig(
        **sampling_from_args(a), num_samples=a.num_samples, batch_size=a.batch_size, precision=a.precision
    )
    res = generate(a.model, a.prompts, a.out, cfg.to_dict(), a.workers, a.store, progress=not a.json)
    if not a.json:
        print(
            f"{res['records']} records ({res['errors']} with errors) from {res['model']} in {res['out']}"
            f" at {res['chars_per_s']} chars/s",
            file=sys.stderr,
        )
    return res


def _pipeline(a: argparse.Namespace) -> dict[str, Any]:
    from charlm.cli import check_train_precision, train_config_from_args

    cfg = train_config_from_args(a)
    check_train_precision(cfg.precision, "auto", True, a.gpu)  # before the corpus is ingested
    from charlm.storage_check import check_ingest

    check_ingest(a.corpus, a.store)
    from charlm import prefect_server

    prefect_server.ensure()
    from flows.pipeline import pipeline  # Prefect starts logging on import: after the checks

    scaling = {"workers": a.workers, "use_gpu": a.gpu, "max_failures": a.max_failures}
    gen = {"num_samples": a.num_samples, "length": a.length}
    res = pipeline(
        a.corpus,
        a.name,
        config=cfg.to_dict(),
        scaling=scaling,
        store=a.store,
        margin=a.margin,
        prompts=a.prompts,
        generate_config=gen,
        tracking_uri=a.tracking_uri,
        progress=not a.json,
    )
    if not a.json:
        _print_pipeline(res, a.name)
    return res


def _print_pipeline(res: dict[str, Any], name: str) -> None:
    t, d = res["trained"], res["decision"]
    how = (
        "reused (this dataset and config were trained before)"
        if t.get("skipped")
        else "trained and registered"
    )
    print(
        f"dataset {res['dataset']['id'][:16]}{' (unchanged)' if res['dataset']['reused'] else ''}",
        file=sys.stderr,
    )
    print(f"model {name} version {t['version']}: {how}", file=sys.stderr)
    from flows.evaluate import describe

    print(f"@{d['alias']}: {describe(d)}", file=sys.stderr)
    print(f"samples: {res['samples']['out']}", file=sys.stderr)


def _prefect_ui_line() -> str:
    """Where the flow runs can be seen: only a UI that is served is named."""
    from charlm import prefect_server

    st = prefect_server.status()
    api = os.environ.get("PREFECT_API_URL")
    if st["running"] and st["url"] == api:
        ui = api.removesuffix("/api")
        return f"Prefect UI:     {ui}   (charlm's local Prefect server; `charlm server stop` stops it)"
    if api:
        return f"Prefect API:    {api}   (its UI, where it serves one, lists the flow runs)"
    return "Prefect:        the flow runs went to a temporary server that is gone now"


def _demo(a: argparse.Namespace) -> dict[str, Any]:
    from charlm import prefect_server, storage
    from charlm.config import TrainConfig
    from charlm.corpus import default_corpus_text
    from charlm.genjob import read_records
    from charlm.tracking import resolve_tracking_uri

    prefect_server.ensure()
    from flows.pipeline import pipeline

    root = storage.store_root(a.store)
    corpus = storage.join(root, "corpora", "python-stdlib", "stdlib.py.txt")
    if not storage.exists(corpus):  # the embedded default: the standard library's own source
        storage.write_text_atomic(corpus, default_corpus_text())
    prompts = a.prompts
    if prompts is None:
        prompts = storage.join(root, "corpora", "python-stdlib", "prompts.txt")
        if not storage.exists(prompts):
            storage.write_text_atomic(prompts, "def \nclass \nimport \n")
    cfg = TrainConfig(time_budget=a.minutes, eval_every=100, hidden_size=a.hidden_size, seed=a.seed)
    print(
        f"charlm demo: ingest the Python standard library's source -> train a {cfg.num_layers}x{cfg.hidden_size} "
        f"{cfg.cell.upper()} on local Ray for {a.minutes:g} min -> register '{a.name}' in MLflow -> evaluate, "
        f"promote -> generate (store: {root})",
        file=sys.stderr,
    )
    res = pipeline(
        [corpus],
        a.name,
        config=cfg.to_dict(),
        scaling={"workers": 1},
        store=a.store,
        generate_config={"num_samples": 1, "length": a.length, "temperature": 0.7, "seed": a.seed},
        prompts=prompts,
        progress=not a.json,
    )
    records = read_records(res["samples"]["out"])
    uri = resolve_tracking_uri(None, a.store)
    if not a.json:
        for r in records:
            if r["sample"] is not None:
                print(f"--- prompt {r['prompt']!r} ---\n{r['prompt']}{r['sample']}\n")
        _print_pipeline(res, a.name)
        print(
            f"\nregistered: models:/{a.name}/{res['trained']['version']}  (champion: models:/{a.name}@champion)\n"
            f"more samples:   charlm sample models:/{a.name}@champion --prime 'def ' --length 500\n"
            f"MLflow UI:      mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   -> http://127.0.0.1:5000\n"
            + _prefect_ui_line(),
            file=sys.stderr,
        )
    return {**res, "tracking_uri": uri, "sample_records": records}


def add_commands(sub: argparse._SubParsersAction) -> None:
    from charlm.cli import add_sample_precision_flag, add_sampling_flags

    g = sub.add_parser(
        "generate",
        help="batch generation job: prompts file in, JSONL samples out (Ray actors)",
        description="Generate --num-samples samples per prompt. MODEL: models:/NAME@ALIAS, models:/NAME/VERSION, "
        "a checkpoint path/URL or a run folder. PROMPTS: a text file (one prompt per line) or .jsonl "
        '({"prompt": ..., "id": ...} per line) at any store URL. Output: <out>/part-*.jsonl and manifest.json '
        "(written last). A record's text depends only on the seed, its prompt and its index, not on --workers.",
    )
    g.add_argument("model", metavar="MODEL")
    g.add_argument("--prompts", required=True, help="URL or path of the prompts file")
    g.add_argument("--out", default=None, help="output folder URL (default <store>/samples/gen-<hash>)")
    g.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default %(default)s)")
    add_sampling_flags(g)
    g.add_argument(
        "--batch-size", type=int, default=256, help="streams per forward step (default %(default)s)"
    )
    add_sample_precision_flag(g)
    g.add_argument("--workers", type=int, default=1, help="Ray actors (default %(default)s: in-process)")
    g.add_argument("--store", default=None, help="store root (default $CHARLM_STORE or ~/.charlm/store)")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
    g.set_defaults(func=_generate)

    from charlm.cli import _add_train_flags
    from charlm.config import SamplingParams

    p = sub.add_parser(
        "pipeline",
        help="ingest -> train on Ray -> register -> evaluate vs the champion -> promote if better -> generate",
        description="The end-to-end flow for model NAME. Re-running it on an unchanged corpus trains nothing; "
        "a failed run resumes where it stopped. Takes the model and training flags of `charlm train`.",
    )
    p.add_argument("corpus", nargs="+", metavar="CORPUS", help="objects, prefixes or globs at any store URL")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--store", default=None, help="store root (default $CHARLM_STORE or ~/.charlm/store)")
    p.add_argument("--workers", type=int, default=1, help="Ray DDP workers (default %(default)s)")
    p.add_argument("--gpu", dest="gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--no-gpu", dest="gpu", action="store_false", help="CPU workers")
    p.add_argument("--max-failures", type=int, default=2, help="worker restarts (default %(default)s)")
    p.add_argument(
        "--margin", type=float, default=0.01, help="bits/char a candidate must win by (default %(default)s)"
    )
    p.add_argument(
        "--prompts", default=None, help="prompts file for the sample set (default: a few built-in prompts)"
    )
    p.add_argument("--num-samples", type=int, default=2, help="samples per prompt (default %(default)s)")
    p.add_argument(
        "--length",
        type=int,
        default=SamplingParams().length,
        help="characters per sample (default %(default)s)",
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
    _add_train_flags(p)
    p.set_defaults(func=_pipeline)

    d = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded default corpus (the Python standard library's source)",
        description="The main job on the embedded default: local store folder, local Ray, ephemeral Prefect, "
        "sqlite MLflow. Ingests the Python standard library's own source (present on any machine with Python), "
        "trains for --minutes, registers and promotes the model, generates samples and prints them.",
    )
    d.add_argument("--minutes", type=float, default=4.0, help="training time budget (default %(default)s)")
    d.add_argument("--hidden-size", type=int, default=512, help="(default %(default)s)")
    d.add_argument("--length", type=int, default=400, help="characters per sample (default %(default)s)")
    d.add_argument("--seed", type=int, default=1337, help="(default %(default)s)")
    d.add_argument("--name", default="python-stdlib", help="registered model name (default %(default)s)")
    d.add_argument("--prompts", default=None, help="prompts file URL (default: def / class / import)")
    d.add_argument("--store", default=None, help="store root (default $CHARLM_STORE or ~/.charlm/store)")
    d.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
    d.set_defaults(func=_demo)
