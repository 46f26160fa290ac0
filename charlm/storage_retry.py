"""Storage failures: which errors are transient, how long S3 requests retry them, and the one line
that reports them. Part of the storage adapter: charlm.storage re-exports these names.

One retry layer, one budget. s3fs 2026.9 has two retry loops on top of each other: botocore's
(``Config(retries=...)``: legacy mode 5 attempts, standard mode 3, with random backoff up to 20 s)
inside s3fs's own ``_error_wrapper`` (``S3FileSystem.retries`` = 5 tries, 0.1 * 1.7**i s apart),
which retries ``s3fs.core.S3_RETRYABLE_ERRORS`` unconditionally and anything else only when
``s3fs.core.CUSTOM_ERROR_HANDLER`` says so. ``_cat_file`` nests one ``_error_wrapper`` in another.
So tries multiply (up to 5 x 5 x 5 for one read) and each waits up to a 15 s read timeout.

Here botocore makes one attempt (``max_attempts=1``) and s3fs's loop is the only one. Every error
goes to one decision, :func:`retry_decision` (``S3_RETRYABLE_ERRORS`` is emptied, the custom
handler installed): retry a transient error (``is_transient``) while the operation's failures
have lasted less than the budget, ``$CHARLM_STORAGE_RETRY_S`` (default 10 s). The budget is
counted per s3fs operation (one asyncio task: a stat, a page of a listing, a GET, a part upload),
from the start of its first failed try, and a try is started only when it could end within the
budget, a timed-out try counting its timeout. So an endpoint that refuses, drops or never answers
fails after at most the budget, and a restart shorter than the budget is ridden out: the waits
(0.1, 0.17, 0.29 ... s) start short and grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

BUDGET_ENV = "CHARLM_STORAGE_RETRY_S"
DEFAULT_BUDGET_S = 10.0
_TRIES_ATTR = "_charlm_tries"  # set on the last error of an operation: how many tries it made


class StorageError(OSError):
    """A storage operation failed; the message names the URL."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object, prefix or match at a URL."""


class TransientStorageError(StorageError):
    """Connection refused/reset, timeout, throttling or a 5xx: retrying may succeed."""


class StorageUnreachableError(TransientStorageError):
    """The endpoint could not be reached (refused, unresolvable, no answer) within the budget."""


# -- the budget -----------------------------------------------------------------------------------
def s3fs_wait(i: int) -> float:
    """s3fs's sleep after its i-th failed try (s3fs.core._error_wrapper)."""
    return min(1.7**i * 0.1, 15.0)


@dataclass(frozen=True)
class RetryBudget:
    """How long one S3 operation keeps retrying, and the timeouts of each try."""

    seconds: float  # failures of one operation last at most this long
    connect_timeout: float  # seconds to open a connection
    read_timeout: float  # seconds without a byte from the server
    max_tries: int  # tries of one operation: what fits the budget, capped by AWS_MAX_ATTEMPTS

    @classmethod
    def from_env(cls) -> RetryBudget:
        raw = os.environ.get(BUDGET_ENV, "").strip()
        try:
            seconds = float(raw) if raw else DEFAULT_BUDGET_S
        except ValueError:
            seconds = -1.0
        if not (math.isfinite(seconds) and 0 <= seconds <= 3600):
            raise StorageError(f"{BUDGET_ENV}={raw!r}: not a number of seconds between 0 and 3600")
        tries, spent = 1, 0.0
        while spent + s3fs_wait(tries - 1) <= seconds:
            spent += s3fs_wait(tries - 1)
            tries += 1
        cap = os.environ.get("AWS_MAX_ATTEMPTS", "").strip()
        if cap.isdigit() and int(cap) >= 1:  # botocore's own setting, honoured as a cap on tries
            tries = min(tries, int(cap))
        return cls(seconds, min(5.0, max(1.0, seconds / 4)), max(5.0, seconds), tries)

    def botocore_config(self) -> dict:
        """S3FileSystem's config_kwargs: botocore's timeouts, one attempt (s3fs's loop retries)."""
        return {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
        }


_budget: RetryBudget | None = None
# asyncio task -> [start of its failures, tries, last error, time of the last failure]
_failures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install_s3_retry_policy() -> RetryBudget:
    """Route every s3fs retry through retry_decision; returns the budget, whose botocore_config()
    and max_tries (S3FileSystem.retries) a new S3FileSystem takes. Reads $CHARLM_STORAGE_RETRY_S
    each time: a filesystem made later (storage.reset()) sees a changed value."""
    global _budget
    import s3fs.core

    _budget = RetryBudget.from_env()
    s3fs.core.S3_RETRYABLE_ERRORS = ()  # no unconditional retries: all go through the budget
    s3fs.core.set_custom_error_handler(retry_decision)
    return _budget


def _timeout_of(exc: BaseException, budget: RetryBudget) -> float:
    """How long a failed try lasted, if it failed by timing out (else 0: it failed at once)."""
    for e in _chain(exc):
        name = type(e).__name__
        if name == "ConnectTimeoutError":
            return budget.connect_timeout
        if name in ("ReadTimeoutError", "FSTimeoutError") or isinstance(e, TimeoutError):
            return budget.read_timeout
    return 0.0


def retry_decision(exc: BaseException) -> bool:
    """s3fs's retry handler: whether to try the failed request again (see the module docstring)."""
    budget = _budget or RetryBudget.from_env()
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    now = time.monotonic()
    took = _timeout_of(exc, budget)
    state = _failures.get(task) if task is not None else None
    # a failure long after the last one (a long listing, minutes later) starts a new streak
    if state is None or now - state[3] > s3fs_wait(budget.max_tries) + budget.read_timeout + 1:
        state = [now - took, 0, None, now]
        if task is not None:
            _failures[task] = state
    if state[2] is not exc:  # a nested retry loop sees the same error again: not a new try
        state[1] += 1
        state[2] = exc
    state[3] = now
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _TRIES_ATTR, state[1])
    if not is_transient(exc) or state[1] >= budget.max_tries:
        return False
    return now - state[0] + s3fs_wait(state[1] - 1) + took <= budget.seconds


# -- classification --------------------------------------------------------------------------------
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EAGAIN,
        errno.EBUSY,  # s3fs: SlowDown / ServiceUnavailable / 503
        getattr(errno, "EREMOTEIO", 121),  # s3fs: InternalError / 500
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "XAmzContentSHA256Mismatch",  # s3fs retried it: a body garbled on the way
        "500",
        "502",
        "503",
        "504",
    }
)
# what s3fs retried unconditionally (S3_RETRYABLE_ERRORS), by name: a short read of a body, a
# response that did not parse (rate-limiting answers can be invalid XML)
_TRANSIENT_NAMES = frozenset({"IncompleteRead", "ResponseParserError", "FSTimeoutError"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(seen) < 8:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) is worth retrying."""
    for e in _chain(exc):
        if isinstance(e, TransientStorageError):
            return True
        if isinstance(e, ObjectNotFoundError | PermissionError):
            return False
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if "botocore" in sys.modules:
            from botocore import exceptions as bx

            transient = (
                bx.ConnectionError,
                bx.HTTPClientError,
                bx.IncompleteReadError,
                bx.ResponseStreamingError,
            )
            if isinstance(e, transient):
                return True
            if isinstance(e, bx.ClientError):
                code = str(e.response.get("Error", {}).get("Code", ""))
                status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
                if code in _TRANSIENT_CODES or status in _TRANSIENT_CODES:
                    return True
        if "aiohttp" in sys.modules:
            import aiohttp

            if isinstance(e, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
                return True
    return False


# -- the one line -----------------------------------------------------------------------------------
def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _os_text(exc: OSError) -> str:
    """An OSError as '<errno text>' or '<errno text>: <file>'."""
    text = exc.strerror or _short(exc)
    return f"{text}: {exc.filename}" if exc.filename else text


def _unreachable(exc: BaseException) -> tuple[str, str] | None:
    """(endpoint, reason) when the error is a failure to reach the server at all."""
    endpoint, reason = "", ""
    for e in _chain(exc):
        kwargs = getattr(e, "kwargs", None)
        if not endpoint and isinstance(kwargs, dict) and kwargs.get("endpoint_url"):
            parts = urlsplit(str(kwargs["endpoint_url"]))
            endpoint = f"{parts.scheme}://{parts.netloc}" if parts.netloc else str(kwargs["endpoint_url"])
        name = type(e).__name__
        if not reason and name == "ConnectTimeoutError":
            reason = "no answer to connect" + (
                f" within {_budget.connect_timeout:g} s" if _budget is not None else ""
            )
        elif not reason and isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            reason = os.strerror(e.errno).lower()
        elif not reason and name == "ClientConnectorDNSError":
            reason = "name does not resolve"
    if not endpoint or not any(
        type(e).__name__ in ("EndpointConnectionError", "ConnectTimeoutError") for e in _chain(exc)
    ):
        return None
    return endpoint, reason or "cannot connect"


def _tries(exc: BaseException, elapsed: float | None) -> str:
    n = next((getattr(e, _TRIES_ATTR) for e in _chain(exc) if hasattr(e, _TRIES_ATTR)), None)
    parts = [f"{n} {'try' if n == 1 else 'tries'}"] if n else []
    if elapsed is not None:
        parts.append(f"in {elapsed:.1f} s")
    return " ".join(parts)


def translate_error(
    exc: BaseException, url: str, action: str = "", elapsed: float | None = None
) -> StorageError:
    """A StorageError subclass naming the URL, for any error raised by a storage backend.
    elapsed: the seconds the operation took, reported with the tries of an unreachable server."""
    if isinstance(exc, StorageError):
        return exc
    what = f"{action} " if action else ""
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFoundError(f"{url}: {what}not found")
    if isinstance(exc, PermissionError):
        return StorageError(f"{url}: {what}permission denied ({_os_text(exc)})")
    if is_transient(exc):
        tries = _tries(exc, elapsed)
        down = _unreachable(exc)
        if down is not None:
            endpoint, reason = down
            return StorageUnreachableError(
                f"{url}: {what}failed, storage unreachable at {endpoint} ({reason}"
                + (f"; {tries})" if tries else ")")
            )
        return TransientStorageError(
            f"{url}: {what}failed, storage unreachable or busy ({_short(exc)}"
            + (f"; {tries})" if tries else ")")
        )
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return StorageError(f"{url}: {what}failed ({_os_text(exc)})")
    return StorageError(f"{url}: {what}failed ({type(exc).__name__}: {_short(exc)})")


_BACKENDS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec")


@contextlib.contextmanager
def errors(url: str, action: str = "") -> Iterator[None]:
    """Raise what the block raises as a StorageError naming url (with how long it took)."""
    start = time.monotonic()
    try:
        yield
    except StorageError:
        raise
    except (OSError, ValueError, RuntimeError, TimeoutError, ConnectionError) as e:
        raise translate_error(e, url, action, time.monotonic() - start) from e
    except Exception as e:  # backend-specific classes (botocore, aiohttp...)
        if type(e).__module__.split(".")[0] in _BACKENDS:
            raise translate_error(e, url, action, time.monotonic() - start) from e
        raise
