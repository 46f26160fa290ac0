"""`python -m charlm.tracking prepare-sqlite sqlite:///FILE [DEFAULT_ARTIFACT_ROOT]`: create and
migrate a sqlite tracking database under charlm's lock (see sqlite_store) before something else
uses it first, e.g. `mlflow server --backend-store-uri sqlite:///FILE` with DEFAULT_ARTIFACT_ROOT
`mlflow-artifacts:/` (the server's default when it serves artifacts). One line on failure."""

from __future__ import annotations

import sys

from charlm.tracking.sqlite_store import SqliteStoreError, prepare, sqlite_path

USAGE = "usage: python -m charlm.tracking prepare-sqlite sqlite:///FILE [DEFAULT_ARTIFACT_ROOT]"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or args[0] != "prepare-sqlite" or sqlite_path(args[1]) is None:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        prepare(args[1], args[2] if len(args) == 3 else None)
    except SqliteStoreError as e:
        print(f"charlm: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
