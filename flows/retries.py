"""Retry policy shared by the flows' storage-touching tasks."""

from __future__ import annotations

from typing import Any

from charlm import storage


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry only transient storage errors, and not an endpoint found
    unreachable: the storage layer already retried it for its whole budget
    ($CHARLM_STORAGE_RETRY_S), and retrying the task on top would multiply the wait (an ingest
    whose store died mid-encode took ~55 s to fail instead of ~12 s)."""
    try:
        state.result()
    except Exception as e:
        return storage.is_transient(e) and not isinstance(e, storage.StorageUnreachableError)
    return False
