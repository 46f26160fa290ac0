"""Prefect flows (wiring only). Importing the package switches framework telemetry off."""

from charlm import telemetry

telemetry.disable()
