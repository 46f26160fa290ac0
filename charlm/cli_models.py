"""`charlm models list|compare|promote`: the registry from the command line.

Each subcommand returns a JSON-able dict (printed by charlm.cli with --json) and otherwise prints
a table. Versions may be given as numbers or @aliases. The tracking URI is --tracking-uri, else
$MLFLOW_TRACKING_URI, else the sqlite file beside the store (see charlm.tracking).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite beside the store)",
    )
    p.add_argument("--store", default=None, help="store root (default $CHARLM_STORE or ~/.charlm/store)")
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print one JSON object on stdout at the end",
    )


def add_commands(subparsers: Any) -> None:
    m = subparsers.add_parser(
        "models",
        help="registered models: list versions, compare them, promote one by alias",
        description="The MLflow model registry: versions registered by `charlm train --register NAME`.",
    )
    m.add_argument("--json", action="store_true", default=False, help="print one JSON object on stdout")
    sub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    ls = sub.add_parser(
        "list",
        help="versions with aliases, dataset, val bpc and creation time",
        description="List the versions of a registered model.",
    )
    ls.add_argument("name", metavar="NAME")
    _common(ls)
    ls.set_defaults(func=cmd_list)

    c = sub.add_parser(
        "compare",
        help="evaluate versions on the same held-out split",
        description=(
            "Evaluate versions of NAME on the same held-out split (the test split of the named "
            "dataset; default the champion's dataset) and rank them by bits per character. A "
            "version whose vocabulary lacks characters of the dataset is scored only on the text "
            "it can encode, and the report says so."
        ),
    )
    c.add_argument("name", metavar="NAME")
    c.add_argument("versions", nargs="*", metavar="VERSION", help="numbers or @aliases (default: all)")
    c.add_argument("--dataset", default=None, metavar="ID", help="dataset id, id prefix, name or URL")
    c.add_argument("--split", choices=("test", "val"), default="test", help="(default %(default)s)")
    c.add_argument(
        "--max-chars", type=int, default=None, help="score only the first N characters of the split"
    )
    c.add_argument("--batch-size", type=int, default=16, help="evaluation streams (default %(default)s)")
    c.add_argument("--seq-len", type=int, default=256, help="evaluation chunk length (default %(default)s)")
    c.add_argument(
        "--cells",
        type=int,
        default=0,
        metavar="N",
        help="also name each version's best cell per text feature over the split's first N characters "
        "(charlm visualize; default 0: off)",
    )
    _common(c)
    c.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "promote",
        help="point an alias (default champion) at a version",
        description="Move ALIAS (default champion) to VERSION of NAME.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION", help="a version number or an @alias")
    p.add_argument("--alias", default="champion", help="(default %(default)s)")
    _common(p)
    p.set_defaults(func=cmd_promote)


def _as_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(out)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    from charlm import tracking

    r = tracking.list_versions(args.name, tracking_uri=args.tracking_uri, store=args.store)
    if not _as_json(args):
        print(render_list(r))
    return r


def render_list(r: dict[str, Any]) -> str:
    rows = [
        (
            v["version"],
            ", ".join("@" + a for a in v["aliases"]),
            (v["dataset_id"] or "")[:12],
            _fmt(v["val_bpc"]),
            v["step"],
            v["created"],
            v["run_id"],
        )
        for v in r["versions"]
    ]
    head = f"model {r['name']} ({len(rows)} version{'s' if len(rows) != 1 else ''}) in {r['tracking_uri']}"
    return head + "\n" + table(("version", "aliases", "dataset", "val bpc", "step", "created", "run"), rows)


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    from charlm import tracking

    r = tracking.compare_versions(
        args.name,
        args.versions or None,
        dataset=args.dataset,
        split=args.split,
        max_chars=args.max_chars,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        cells=args.cells,
        tracking_uri=args.tracking_uri,
        store=args.store,
    )
    if not _as_json(args):
        print(render_compare(r))
    return r


def render_compare(r: dict[str, Any]) -> str:
    rows = [
        (
            x["rank"] or "-",
            x["version"],
            ", ".join("@" + a for a in x["aliases"]),
            _fmt(x["bpc"]),
            _fmt(x["loss"]),
            x["chars_scored"],
            f"{100 * x['coverage']:.1f}%" + ("" if x["same_vocab"] else " *"),
            (x["trained_on"] or "")[:12],
            x.get("sweep") or "-",
        )
        for x in r["results"]
    ]
    head = (
        f"model {r['name']} on the {r['split']} split of dataset {r['dataset'][:12]} "
        f"({r['chars']} characters)"
    )
    text = (
        head
        + "\n"
        + table(
            ("rank", "version", "aliases", "bpc", "loss", "chars", "coverage", "trained on", "sweep"), rows
        )
    )
    for x in r["results"]:
        if x.get("best_cells"):
            named = [
                f"{k} L{c['layer']} {c['kind']}{c['cell']} {c['r']:+.2f}"
                for k, c in x["best_cells"].items()
                if c
            ]
            text += f"\nversion {x['version']} best cells: " + ", ".join(named)
    if r["notes"]:
        text += "\n" + "\n".join(f"* {n}" for n in r["notes"])
    return text


def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    from charlm import tracking

    r = tracking.promote(
        args.name, args.version, alias=args.alias, tracking_uri=args.tracking_uri, store=args.store
    )
    if not _as_json(args):
        was = f" (was version {r['previous']})" if r["previous"] is not None and r["changed"] else ""
        same = " (unchanged)" if not r["changed"] else ""
        print(f"model {r['name']}: @{r['alias']} -> version {r['version']}{was}{same}", file=sys.stderr)
    return r
