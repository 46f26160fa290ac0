"""Publishing a dataset: ingest() (list, scan, publish), publish() (pass 2 and the manifest,
written last) and the markdown summary of a published dataset."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from charlm import __version__, storage
from charlm.data import split_sizes
from charlm.ingest.encode import _encode_parallel, _encode_sequential
from charlm.ingest.errors import IngestError
from charlm.ingest.format import FORMAT, SPLITS, read_manifest, validate_name
from charlm.ingest.pool import _parallelism, tune_malloc
from charlm.ingest.scan import build_vocab, check_scans, dataset_id, list_sources, scan_objects
from charlm.ingest.text import CHUNK_SIZE, Policies
from charlm.vocab import Vocab, describe_char

log = logging.getLogger("charlm.ingest")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def publish(
    scans: Sequence[dict[str, Any]],
    policies: Policies,
    store: str | None = None,
    *,
    name: str | None = None,
    requested: Sequence[str] = (),
    vocab: Vocab | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> dict[str, Any]:
    """Pass 2: encode every object and publish datasets/<id>/ (manifest last).

    A no-op when datasets/<id>/manifest.json already exists: the existing dataset is returned
    with reused=True and nothing is written.
    """
    warnings = check_scans(scans)
    did = dataset_id(policies, scans)
    folder = storage.Store.at(store).datasets(did)
    existing = read_manifest(folder)
    if existing is not None:
        return result_of(existing, folder, reused=True, warnings=warnings)

    tune_malloc()
    vocab = vocab or build_vocab(scans)
    n = sum(s["chars"] for s in scans)
    sizes = split_sizes(n, policies.val_frac, policies.test_frac)
    t0 = time.perf_counter()
    storage.makedirs(folder)
    storage.write_text_atomic(storage.join(folder, "vocab.json"), vocab.to_json())
    nonempty = [s for s in scans if s["chars"]]
    n_proc = _parallelism(sum(s["size"] for s in nonempty), len(nonempty))
    if n_proc > 1 and storage.local_path(folder) is not None:
        _encode_parallel(nonempty, policies, vocab, folder, sizes, chunk_size, n_proc)
    else:
        _encode_sequential(nonempty, policies, vocab, folder, sizes, chunk_size)
    seconds = time.perf_counter() - t0
    manifest = _manifest(did, name, policies, requested, scans, vocab, sizes)
    storage.write_text_atomic(storage.join(folder, "manifest.json"), json.dumps(manifest, indent=1))
    log.info("published dataset %s (%d chars, vocab %d) in %.1fs", did, n, len(vocab), seconds)
    return result_of(manifest, folder, reused=False, warnings=warnings)


def _manifest(
    did: str,
    name: str | None,
    policies: Policies,
    requested: Sequence[str],
    scans: Sequence[dict[str, Any]],
    vocab: Vocab,
    sizes: dict[str, int],
) -> dict[str, Any]:
    n = sum(s["chars"] for s in scans)
    return {
        "format": FORMAT,
        "id": did,
        "fingerprint": did,
        "name": name,
        "created": _now(),
        "charlm_version": __version__,
        "policies": policies.to_dict(),
        "sources": {
            "requested": list(requested),
            "objects": [
                {
                    "url": s["url"],
                    "size": s["size"],
                    "version": s["version"],
                    "chars": s["chars"],
                    "sha256": s["sha256"],
                    **({"skipped": "empty"} if not s["chars"] else {}),
                }
                for s in scans
            ],
        },
        "counts": {
            "objects": len(scans),
            "objects_skipped_empty": sum(1 for s in scans if not s["chars"]),
            "bytes": sum(s["size"] for s in scans),
            "chars": n,
            "bom_stripped": sum(s["bom"] for s in scans),
            "crlf_to_lf": sum(s["crlf"] for s in scans),
            "cr_to_lf": sum(s["cr"] for s in scans),
            "invalid_replaced": sum(s["replaced"] for s in scans),
            "objects_normalized": sum(1 for s in scans if s["normalized"]),
        },
        "vocab": {"file": "vocab.json", "size": len(vocab), "dtype": vocab.dtype.name},
        "splits": {k: {"file": f"{k}.npy", "n": sizes[k]} for k in SPLITS},
    }


def result_of(
    manifest: dict[str, Any], folder: str, *, reused: bool, warnings: Sequence[str] = ()
) -> dict[str, Any]:
    """The small, JSON-able summary that ingest returns and the CLI prints."""
    return {
        "id": manifest["id"],
        "url": folder,
        "name": manifest.get("name"),
        "reused": reused,
        "chars": manifest["counts"]["chars"],
        "vocab_size": manifest["vocab"]["size"],
        "splits": {k: v["n"] for k, v in manifest["splits"].items()},
        "objects": manifest["counts"]["objects"],
        "bytes": manifest["counts"]["bytes"],
        "counts": manifest["counts"],
        "warnings": list(warnings),
    }


def ingest(
    sources: Sequence[str] | str,
    store: str | None = None,
    policies: Policies | None = None,
    *,
    name: str | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> dict[str, Any]:
    """List, scan, publish, in this process (the Prefect flow runs the same steps as tasks)."""
    if name is not None:
        validate_name(name)  # before any work
    policies = policies or Policies()
    srcs = [sources] if isinstance(sources, str) else list(sources)
    objects = list_sources(srcs)
    scans = scan_objects(objects, policies, chunk_size)
    return publish(scans, policies, store, name=name, requested=srcs, chunk_size=chunk_size)


def summary_markdown(manifest: dict[str, Any], vocab: Vocab | None = None, *, reused: bool = False) -> str:
    """A markdown summary of a dataset: sources, sizes, vocab, top characters, policy counts."""
    c = manifest["counts"]
    lines = [
        f"# Dataset `{manifest['id'][:16]}`" + (f" ({manifest['name']})" if manifest.get("name") else ""),
        "",
        f"- id: `{manifest['id']}`" + (" (already published; reused)" if reused else ""),
        f"- created: {manifest['created']}, charlm {manifest['charlm_version']}",
        f"- {c['objects']} objects, {c['bytes']:,} bytes, {c['chars']:,} characters, "
        f"vocab {manifest['vocab']['size']} ({manifest['vocab']['dtype']})",
        "- splits: " + ", ".join(f"{k} {v['n']:,}" for k, v in manifest["splits"].items()),
        "- policies: " + ", ".join(f"{k}={v}" for k, v in manifest["policies"].items()),
        f"- policy counts: BOM stripped {c['bom_stripped']}, CRLF->LF {c['crlf_to_lf']:,}, "
        f"CR->LF {c['cr_to_lf']:,}, invalid replaced {c['invalid_replaced']:,}, "
        f"empty skipped {c['objects_skipped_empty']}, normalized objects {c['objects_normalized']}",
        "",
        "| source | bytes | chars | version |",
        "|---|---:|---:|---|",
    ]
    objs = manifest["sources"]["objects"]
    for o in objs[:50]:
        lines.append(
            f"| {o['url']} | {o['size']:,} | {o['chars']:,}{' (empty, skipped)' if o.get('skipped') else ''} "
            f"| {o['version']} |"
        )
    if len(objs) > 50:
        lines.append(f"| ... {len(objs) - 50} more | | | |")
    if vocab is not None and vocab.counts:
        total = sum(vocab.counts) or 1
        top = sorted(zip(vocab.chars, vocab.counts, strict=True), key=lambda t: -t[1])[:20]
        lines += ["", "| top characters | count | share |", "|---|---:|---:|"]
        for ch, n in top:
            shown = describe_char(ch).replace("|", "\\|")
            lines.append(f"| {shown} | {n:,} | {100 * n / total:.2f}% |")
    return "\n".join(lines) + "\n"


def dataset_summary(folder: str, *, reused: bool = False) -> str:
    """summary_markdown for a published dataset folder (reads manifest.json and vocab.json)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise IngestError(f"{folder}: no manifest.json (not a published dataset)")
    vocab = Vocab.from_json(storage.read_bytes(storage.join(folder, manifest["vocab"]["file"])))
    return summary_markdown(manifest, vocab, reused=reused)
