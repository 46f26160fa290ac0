"""Ingestion throughput and memory: a generated multi-object corpus from a local folder and from a
local S3 server (moto_server, a separate process on 127.0.0.1), at two corpus sizes.

Each ingestion runs in a fresh child process; the parent samples the resident memory of the
child's whole process tree (/proc, every 20 ms). peak_tree_rss_mb is the larger of that sampled
peak and the kernel's high-water mark (VmHWM) of the ingesting process itself: exact when the
tree is that one process (the library runs); the flow runs add Prefect's API server, and
tree_hwm_sum_mb (the sum of every process's own peak) bounds their tree from above.
(ru_maxrss is not used: Linux carries it over from the parent across fork and exec.) MB/s is corpus bytes / seconds from listing to published
manifest (both passes: scan and encode), measured inside the child.

    .venv/bin/python bench/ingest.py                       # sizes 100 and 300 MB, folder + S3
    .venv/bin/python bench/ingest.py --sizes 50 --no-s3    # quick
    .venv/bin/python bench/ingest.py --flow                # also the Prefect flow (largest size):
                                                           # temporary API server, then PREFECT_API_URL

Prints one JSON object, with where it ran (`machine`). The corpus: mostly English-like prose
with curly quotes, dashes and accented words (about 1 non-ASCII character per 100), one object in
ten multilingual (CJK, Cyrillic, emoji); CRLF line ends in one object in five; 1-12 MB per object
plus some small ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

_WORDS = (
    "the of and to a in that is was he for it with as his on be at by I had not are but from or have "
    "an they which one you were her all she there would their we him been has when who will more no "
    "if out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old"
)
WORDS = _WORDS.split()
RARE = ["“quoted”", "—", "café", "naïve", "Zürich", "‘it’s’", "résumé", "…"]
MULTI = ["日本語の", "テキスト", "中文字符", "русский", "текст", "😀", "🎉", "한국어", "Ελληνικά"]


def _block(rng: np.random.Generator, n_bytes: int, multilingual: bool) -> bytes:
    vocab = WORDS + (MULTI if multilingual else RARE)
    p = np.ones(len(vocab))
    p[len(WORDS) :] = (0.25 if multilingual else 0.012) * len(WORDS) / (len(vocab) - len(WORDS))
    p /= p.sum()
    words = rng.choice(len(vocab), size=n_bytes // 4, p=p)
    lens = rng.integers(8, 16, size=len(words) // 8 + 1)
    out, i = [], 0
    for n in lens:  # sentences of 8-15 words, paragraphs of lines
        out.append(" ".join(vocab[j] for j in words[i : i + n]).capitalize() + ".")
        i += n
        if i >= len(words):
            break
    text = "\n".join(out).encode()[:n_bytes]
    return text.decode("utf-8", "ignore").encode()  # no character cut at the end


def make_corpus(folder: Path, total_mb: int, seed: int = 0) -> dict[str, int]:
    """Objects of 1-12 MB (plus a few small ones) summing to about total_mb MB."""
    rng = np.random.default_rng(seed)
    base = {False: _block(rng, 8 << 20, False), True: _block(rng, 2 << 20, True)}
    folder.mkdir(parents=True, exist_ok=True)
    total, i, sizes = 0, 0, {}
    target = total_mb * 1_000_000
    while total < target:
        size = int(rng.integers(1 << 20, 12 << 20)) if i % 7 else int(rng.integers(1000, 200_000))
        size = min(size, target - total) or 1
        multi = i % 10 == 3
        src = base[multi]
        start = int(rng.integers(0, len(src) // 2))
        while src[start] & 0xC0 == 0x80:  # start on a character boundary
            start += 1
        data = bytearray()
        while len(data) < size:  # rotate through the base block from a random start
            data += src[start : start + size - len(data)]
            start = 0
        data = bytes(data)
        if i % 5 == 1:
            data = data.replace(b"\n", b"\r\n")[:size]
        while data and data[-1] >= 0x80:
            data = data[:-1]  # do not cut a character in half at the end of the object
        name = f"part-{i:04d}.txt"
        (folder / name).write_bytes(data)
        sizes[name] = len(data)
        total += len(data)
        i += 1
    return sizes


# -- measuring a child process tree --------------------------------------------------------------------
def _tree_memory(pid: int) -> tuple[int, dict[int, int]]:
    """(sum of VmRSS of pid and its descendants, {pid: VmHWM}) in bytes, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    total, hwm, todo = 0, {}, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                    elif line.startswith("VmHWM:"):
                        hwm[p] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return total, hwm


def _hwm_self() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = 0
    hwm: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            rss, h = _tree_memory(proc.pid)
            peak = max(peak, rss)
            for p, v in h.items():
                hwm[p] = max(hwm.get(p, 0), v)
            stop.wait(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{err.decode()[-3000:]}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    hwm[proc.pid] = max(hwm.get(proc.pid, 0), int(res.pop("hwm_bytes")))
    res["processes"] = len(hwm)
    res["tree_rss_sampled_mb"] = round(peak / 2**20, 1)
    res["tree_hwm_sum_mb"] = round(sum(hwm.values()) / 2**20, 1)  # upper bound of the tree's peak
    res["ingest_process_hwm_mb"] = round(hwm[proc.pid] / 2**20, 1)
    # one process: its high-water mark is exact; several: sampling, bounded above by the HWM sum
    res["peak_tree_rss_mb"] = max(res["tree_rss_sampled_mb"], res["ingest_process_hwm_mb"])
    res["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return res


def child(mode: str, source: str, store: str) -> None:
    """Runs in the child: one ingestion, JSON on stdout."""
    sys.path.insert(0, str(ROOT))
    t_import = time.perf_counter()
    from charlm import ingest

    if mode == "flow":
        from flows.ingest import ingest_corpus
    t0 = time.perf_counter()
    r = ingest_corpus([source], store=store) if mode == "flow" else ingest.ingest([source], store)
    dt = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "mode": mode,
                "source": source.split("://")[0] if "://" in source else "folder",
                "bytes": r["bytes"],
                "chars": r["chars"],
                "vocab_size": r["vocab_size"],
                "seconds": round(dt, 3),
                "mb_per_s": round(r["bytes"] / dt / 1e6, 1),
                "import_s": round(t0 - t_import, 2),
                "hwm_bytes": _hwm_self(),
                "reused": r["reused"],
            }
        )
    )


# -- S3 server ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoProcess:
    def __init__(self) -> None:
        self.port = _free_port()
        exe = Path(PY).parent / "moto_server"
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto_server did not start")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class PrefectServer:
    def __init__(self, env: dict[str, str]) -> None:
        import urllib.request

        self.port = _free_port()
        exe = Path(PY).parent / "prefect"
        self.proc = subprocess.Popen(
            [str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--no-ui"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.api = f"http://127.0.0.1:{self.port}/api"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.api + "/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("prefect server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def upload(folder: Path, bucket_url: str) -> None:
    from charlm import storage

    fs, path = storage.filesystem(bucket_url)
    fs.mkdir(path.split("/")[0])
    fs.put(str(folder) + "/", path + "/", recursive=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,300", help="corpus sizes in MB (default %(default)s)")
    ap.add_argument("--no-s3", action="store_true", help="local folder only")
    ap.add_argument("--flow", action="store_true", help="also run the Prefect flow (largest size, folder)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed after)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SOURCE", "STORE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return

    work = Path(a.work or tempfile.mkdtemp(prefix="charlm-bench-ingest-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    results: dict[str, Any] = {"runs": [], "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    moto = None
    try:
        if not a.no_s3:
            moto = MotoProcess()
            env.update(
                AWS_ENDPOINT_URL=moto.endpoint,
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
            )
            os.environ.update(
                {
                    k: env[k]
                    for k in (
                        "AWS_ENDPOINT_URL",
                        "AWS_ACCESS_KEY_ID",
                        "AWS_SECRET_ACCESS_KEY",
                        "AWS_DEFAULT_REGION",
                    )
                }
            )
        sizes = [int(s) for s in a.sizes.split(",")]
        for mb in sizes:
            folder = work / f"corpus-{mb}"
            t = time.perf_counter()
            objs = make_corpus(folder, mb)
            gen = time.perf_counter() - t
            info = {
                "size_mb": mb,
                "objects": len(objs),
                "bytes": sum(objs.values()),
                "generate_s": round(gen, 1),
            }
            runs = []
            runs.append(run_child(["--child", "library", str(folder), str(work / f"store-{mb}-folder")], env))
            if moto is not None:
                bucket = f"s3://bench-{mb}"
                t = time.perf_counter()
                sys.path.insert(0, str(ROOT))
                upload(folder, bucket)
                info["upload_s"] = round(time.perf_counter() - t, 1)
                runs.append(
                    run_child(["--child", "library", bucket + "/", str(work / f"store-{mb}-s3")], env)
                )
            if a.flow and mb == max(sizes):
                # as a laptop runs it (a temporary Prefect server inside the process tree) ...
                runs.append(run_child(["--child", "flow", str(folder), str(work / f"store-{mb}-flow")], env))
                runs[-1]["prefect_api"] = "temporary server (in the tree)"
                # ... and as a team runs it (PREFECT_API_URL: a server outside the tree)
                server = PrefectServer(env)
                try:
                    runs.append(
                        run_child(
                            ["--child", "flow", str(folder), str(work / f"store-{mb}-flow2")],
                            {**env, "PREFECT_API_URL": server.api},
                        )
                    )
                    runs[-1]["prefect_api"] = "PREFECT_API_URL (server outside the tree)"
                finally:
                    server.stop()
            results["runs"].append({**info, "ingest": runs})
            print(json.dumps(results["runs"][-1]), file=sys.stderr)
            shutil.rmtree(work / f"store-{mb}-folder", ignore_errors=True)
            shutil.rmtree(work / f"store-{mb}-s3", ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if moto is not None:
            moto.stop()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    # where the figures were measured; imported only now, so torch's import (capability's) runs
    # after the measurements and never beside them
    sys.path.insert(0, str(ROOT))
    from charlm.capability import machine_info

    print(json.dumps({"machine": machine_info(), **results}, indent=1))


if __name__ == "__main__":
    main()
