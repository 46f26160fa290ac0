"""Telemetry off for every framework charlm drives, unless the user's environment says otherwise.

Called first thing by the CLI and by the flows package (which Prefect workers import), before
Prefect, Ray or MLflow are imported: they read these variables at import or start-up."""

from __future__ import annotations

import os

OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the ephemeral/local Prefect server's telemetry
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",  # honoured by MLflow and others
}


def disable() -> None:
    for key, value in OFF.items():
        os.environ.setdefault(key, value)
