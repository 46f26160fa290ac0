"""`charlm ingest` and `charlm datasets list|show`: argparse wiring for charlm/cli.py.

add_commands(subparsers) adds the subcommands. Each leaf parser sets:
  func(args) -> dict     runs the command and returns the JSON-able result (the CLI prints it
                         with --json); without --json func prints the human-readable form itself
  render(result) -> str  that human-readable form
and defines --json and --store itself. Errors are raised as IngestError, DatasetError or
StorageError (each with a one-line message naming the object and the problem).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from charlm import datasets
from charlm.ingest import INVALID, NEWLINES, NORMAL_FORMS
from charlm.storage import STORE_ENV


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help=f"store root (folder, s3://bucket/prefix, any fsspec URL); default ${STORE_ENV} or ~/.charlm/store",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_commands(subparsers: Any) -> None:
    """Add `ingest` and `datasets {list,show}` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "ingest",
        help="ingest corpus objects into a versioned dataset",
        description=(
            "Read SOURCEs (objects, prefixes/folders or globs, from any storage URL), apply the text "
            "policies, and publish <store>/datasets/<id>/ (vocab.json, train|val|test.npy, "
            "manifest.json). The id is a content fingerprint: re-ingesting an unchanged corpus "
            "returns the existing id. Runs the Prefect flow `ingest-corpus`."
        ),
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="object, prefix/folder or glob URL")
    p.add_argument("--name", default=None, help="a label stored in the manifest (usable as a reference)")
    p.add_argument(
        "--newlines", choices=NEWLINES, default="lf", help="lf: CRLF and lone CR become LF (default)"
    )
    p.add_argument(
        "--invalid",
        choices=INVALID,
        default="strict",
        help="invalid UTF-8: strict stops with the object and byte offset (default); replace uses U+FFFD",
    )
    p.add_argument(
        "--normalize", choices=NORMAL_FORMS, default=None, help="Unicode normalization (default none)"
    )
    p.add_argument("--val-frac", type=float, default=0.05, help="validation split fraction (default 0.05)")
    p.add_argument("--test-frac", type=float, default=0.05, help="test split fraction (default 0.05)")
    _common(p)
    p.set_defaults(func=cmd_ingest, render=render_ingest)

    d = subparsers.add_parser("datasets", help="list or show published datasets")
    dsub = d.add_subparsers(dest="datasets_command", metavar="{list,show}")
    dsub.required = True
    lp = dsub.add_parser("list", help="list the datasets in the store")
    _common(lp)
    lp.set_defaults(func=cmd_list, render=render_list)
    sp = dsub.add_parser("show", help="show one dataset's manifest")
    sp.add_argument(
        "ref",
        metavar="ID",
        help="dataset id, id:PREFIX (6+ hex digits; a bare prefix works when no name reads the same), "
        "NAME (the newest of that name), NAME@N (its N-th, oldest first) or folder URL",
    )
    _common(sp)
    sp.set_defaults(func=cmd_show, render=render_show)


def _show(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    if not getattr(args, "json", False):
        print(args.render(result))
    return result


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from charlm import prefect_server
    from charlm.ingest.format import validate_name
    from charlm.storage_check import check_ingest

    if args.name is not None:
        validate_name(args.name)
    check_ingest(args.sources, args.store)  # before Prefect starts and the corpus is read
    prefect_server.ensure()
    from flows.ingest import ingest_corpus  # Prefect is imported only when ingesting

    result = ingest_corpus(
        sources=list(args.sources),
        store=args.store,
        name=args.name,
        newlines=args.newlines,
        invalid=args.invalid,
        normalize=args.normalize,
        val_frac=args.val_frac,
        test_frac=args.test_frac,
    )
    return _show(args, result)


def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    from charlm import storage

    result = {"store": storage.store_root(args.store), "datasets": datasets.list_datasets(args.store)}
    return _show(args, result)


def cmd_show(args: argparse.Namespace) -> dict[str, Any]:
    return _show(args, datasets.show(args.ref, args.store))


def render_ingest(r: dict[str, Any]) -> str:
    lines = [
        f"dataset {r['id']}" + (" (unchanged, already published)" if r["reused"] else " (published)"),
        f"  url:    {r['url']}",
        f"  corpus: {r['objects']} objects, {r['bytes']:,} bytes, {r['chars']:,} characters, vocab {r['vocab_size']}",
        "  splits: " + ", ".join(f"{k} {v:,}" for k, v in r["splits"].items()),
    ]
    c = r["counts"]
    policy = [
        f"{c['bom_stripped']} BOM stripped" if c["bom_stripped"] else "",
        f"{c['crlf_to_lf']:,} CRLF->LF" if c["crlf_to_lf"] else "",
        f"{c['cr_to_lf']:,} CR->LF" if c["cr_to_lf"] else "",
        f"{c['invalid_replaced']:,} invalid UTF-8 replaced" if c["invalid_replaced"] else "",
        f"{c['objects_skipped_empty']} empty objects skipped" if c["objects_skipped_empty"] else "",
        f"{c['objects_normalized']} objects normalized" if c["objects_normalized"] else "",
    ]
    if any(policy):
        lines.append("  policy: " + ", ".join(x for x in policy if x))
    lines += [f"  warning: {w}" for w in r.get("warnings", [])[:20]]
    return "\n".join(lines)


def _name_at(d: dict[str, Any]) -> str:
    """NAME@N, the reference that names this dataset among the others of its name."""
    return f"{d['name']}@{d['version']}" if d.get("name") else "-"


def render_list(r: dict[str, Any]) -> str:
    rows = r["datasets"]
    if not rows:
        return f"no datasets in {r['store']}"
    out = [f"{'ID':<14} {'NAME@N':<20} {'CREATED':<20} {'CHARS':>14} {'VOCAB':>5}  SOURCES"]
    for d in rows:
        if "error" in d:
            out.append(f"{d['id'][:12]:<14} ({d['error']})")
            continue
        out.append(
            f"{d['id'][:12]:<14} {_name_at(d)[:20]:<20} {d.get('created') or '-':<20} "
            f"{d['chars']:>14,} {d['vocab_size']:>5}  {' '.join(d['sources'])}"
        )
    return "\n".join(out)


def render_show(r: dict[str, Any]) -> str:
    return json.dumps(r, indent=1)
