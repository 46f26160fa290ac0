"""Retry policy shared by the flows' storage-touching tasks."""

from __future__ import annotations

from typing import Any

from charlm import storage


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry only transient storage errors."""
    try:
        state.result()
    except Exception as e:
        return storage.is_transient(e)
    return False
