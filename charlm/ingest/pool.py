"""Where ingestion's work runs: a helper thread beside the calling one, and worker processes.

_Ordered runs the work that releases the GIL (sha256, writes) on a second core; _run_groups
spreads a scan or an encode over worker processes. A worker runs only the functions registered
with @worker_function (by name), never an arbitrary name sent to it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from charlm.ingest.errors import IngestError

_INLINE_HASH = 256 << 10  # smaller pieces are hashed in the calling thread


@functools.lru_cache(maxsize=1)
def tune_malloc() -> bool:
    """Let glibc reuse freed chunk-sized buffers instead of page-faulting fresh ones (once).

    Each read chunk allocates and frees a few buffers of its size. By default glibc serves such
    sizes with fresh mmaps, or gives the freed top of the heap back to the system, so every chunk
    faults its buffers in again: a third of the CPU time of ingestion, measured. Raising the mmap
    and trim thresholds keeps them in the heap; the cost is that up to 64 MiB of freed memory
    stays with the process. Only on glibc; CHARLM_MALLOC_TUNING=0 turns it off.
    """
    if os.environ.get("CHARLM_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 64 << 20))


class _Ordered:
    """Runs calls in submission order on one worker thread, at most `depth` outstanding.

    Used for the work that releases the GIL (sha256, numpy lookups, writes) so that it runs on a
    second core while the main thread checks the next chunk.
    """

    def __init__(self, depth: int = 2) -> None:
        self._ex = ThreadPoolExecutor(1, thread_name_prefix="charlm-ingest")
        self._pending: deque[Future[Any]] = deque()
        self._depth = depth

    def submit(self, fn: Any, *args: Any) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._ex.submit(fn, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def update_hash(self, h: Any, piece: bytes) -> None:
        """h.update(piece), in order with what was submitted before: on the worker thread for a
        large piece, here for a small one (handing it over would cost more than hashing it)."""
        if len(piece) < _INLINE_HASH:
            self.drain()
            h.update(piece)
        else:
            self.submit(h.update, piece)

    def __enter__(self) -> _Ordered:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._pending:
            f.cancel()
        self._ex.shutdown(wait=True)


# -- processes ----------------------------------------------------------------------------------------
# A scan or an encode is CPU-bound under the GIL, so beyond one core the work is spread over
# worker processes, object by object (an object is never split). Workers are fresh interpreters
# (`python -c ...`, not fork: s3fs and the caller's threads are not fork-safe; not
# multiprocessing's spawn either, which re-runs the caller's main script), kept for the life of
# the process, and used only for corpora large enough to repay their start-up (~0.3 s).
PARALLEL_MIN_BYTES = 48 << 20
_in_worker = False
_pool: _WorkerPool | None = None

F = TypeVar("F", bound=Callable[..., Any])

# The functions a worker may run, by name. Each is registered where it is defined (scan.py,
# encode.py); a worker imports charlm.ingest, which imports those modules, before it serves.
_WORKER_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def worker_function(fn: F) -> F:
    """Registers fn as one that worker processes may run (see _run_groups)."""
    if _WORKER_FUNCTIONS.setdefault(fn.__name__, fn) is not fn:
        raise ValueError(f"two ingest worker functions named {fn.__name__}")
    return fn


def processes() -> int:
    """Worker processes for ingestion: $CHARLM_INGEST_PROCESSES, else the usable CPUs (max 4)."""
    env = os.environ.get("CHARLM_INGEST_PROCESSES")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return min(n, 4)


def _parallelism(total_bytes: int, n_objects: int) -> int:
    if _in_worker or n_objects < 2 or total_bytes < PARALLEL_MIN_BYTES:
        return 1
    return min(processes(), n_objects)


def _send(f: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)))
    f.write(data)
    f.flush()


def _recv(f: Any) -> Any:
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(f.read(n))


def _serve() -> None:
    """A worker's loop: (registered function name, args) in on stdin, (ok, result or exception) out."""
    global _in_worker
    _in_worker = True
    tune_malloc()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, not into the protocol
    inp = sys.stdin.buffer
    while True:
        try:
            name, args = _recv(inp)
        except EOFError:
            return
        try:
            fn = _WORKER_FUNCTIONS.get(name)
            if fn is None:
                raise IngestError(f"{name!r} is not an ingest worker function")
            reply: tuple[bool, Any] = (True, fn(*args))
        except BaseException as e:
            try:
                pickle.dumps(e)
                reply = (False, e)
            except Exception:
                reply = (False, IngestError(f"{type(e).__name__}: {e}"))
        _send(out, reply)


class _WorkerPool:
    """n worker interpreters; call(i, name, args) runs worker function <name>(*args) in worker i."""

    def __init__(self, n: int) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        cmd = [sys.executable, "-c", "from charlm.ingest import pool; pool._serve()"]
        self.n = n
        self.key = _pool_key(n)
        self.broken = False
        self._procs = [
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) for _ in range(n)
        ]

    def call(self, i: int, name: str, args: tuple[Any, ...]) -> Any:
        p = self._procs[i]
        try:
            _send(p.stdin, (name, args))
            ok, value = _recv(p.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            self.broken = True
            raise IngestError(f"an ingest worker process died ({type(e).__name__}: {e})") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        for p in self._procs:
            with contextlib.suppress(Exception):
                p.stdin.close()  # the worker exits at end of input
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def _pool_key(n: int) -> tuple[Any, ...]:
    # workers get the environment when they start: a changed endpoint or credential needs new ones
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "CHARLM_", "FSSPEC_"))))
    return (os.getpid(), n, env)


_pool_lock = threading.Lock()


def _workers(n: int) -> _WorkerPool:
    """The process's pool of n workers (made on first use, renewed if the environment changed)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.broken or _pool.key != _pool_key(n):
            if _pool is not None and _pool.key[0] == os.getpid():
                _pool.close()
            _pool = _WorkerPool(n)
            atexit.register(_pool.close)
        return _pool


def _run_groups(fn: Callable[..., Any], calls: list[tuple[Any, ...]], n: int) -> list[Any]:
    """fn(*args) for every args in calls, over n participants: this process and n - 1 workers,
    each taking the next call when done (so this process works while workers start). fn must be
    a worker function. Results in order; the first error (in call order) is raised once all have
    stopped."""
    name = fn.__name__
    if _WORKER_FUNCTIONS.get(name) is not fn:
        raise ValueError(f"{name} is not an ingest worker function (see worker_function)")
    pool = _workers(n - 1)
    results: list[Any] = [None] * len(calls)
    errors: dict[int, BaseException] = {}
    lock = threading.Lock()
    next_call = iter(range(len(calls)))

    def take() -> int | None:
        with lock:
            return None if errors else next(next_call, None)

    def run(worker: int | None) -> None:
        while (i := take()) is not None:
            try:
                results[i] = fn(*calls[i]) if worker is None else pool.call(worker, name, calls[i])
            except BaseException as e:
                with lock:
                    errors[i] = e
                return

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(n - 1)]
    for t in threads:
        t.start()
    try:
        run(None)
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[min(errors)]
    return results


def _groups(items: Sequence[Any], sizes: Sequence[int], n_groups: int) -> list[list[int]]:
    """Indices of items cut into at most n_groups contiguous runs of about equal total size."""
    total = sum(sizes) or 1
    groups: list[list[int]] = [[]]
    acc = 0
    for i, size in enumerate(sizes):
        if groups[-1] and acc >= total * len(groups) / n_groups:
            groups.append([])
        groups[-1].append(i)
        acc += size
    return groups
