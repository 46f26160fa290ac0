"""What the flows share: the retry policy of their storage-touching tasks, and the check of a
dict parameter's keys."""

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


def known_keys(what: str, given: dict[str, Any] | None, known: tuple[str, ...]) -> dict[str, Any]:
    """A copy of a dict parameter, refused in one line when it holds a key not in `known`."""
    given = dict(given or {})
    unknown = set(given) - set(known)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {sorted(unknown)}; known: {', '.join(known)}")
    return given
