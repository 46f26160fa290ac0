"""Serving throughput: a registered model through `mlflow models serve`, against the Sampler.

A randomly initialised 2x512 LSTM (the demo's size; speed does not depend on the weights) is
registered in a temporary sqlite store and served by `mlflow models serve -m models:/NAME/1
--env-manager local -w W` on 127.0.0.1, once per worker setting. Clients POST
{"inputs": [prompt], "params": {"length": L, "num_samples": S, "seed": i}}: a request is S
streams of L characters, which the pyfunc runs as one batch. The same requests go from 1 client
(a quarter of them), then from 32 at once.

The reference is the same work on charlm's Sampler called directly in this process: the same
requests one after another, each one generate() call of S streams (what the server can at best
do per request, with no HTTP, JSON, pandas or MLflow in the way). On a shared machine the load
changes from minute to minute, so each measurement alternates rounds of the Sampler and the
server and reports medians and the ratio per round. For context the JSON also gives the
Sampler's chars/s on all of 32 requests' streams in one batch, which only batching across
requests (which the server does not do) could reach.

    python bench/serve.py [--length 64 --num-samples 8 --requests 32 --rounds 2 --workers 1 2]
--workers takes W or WxT (T torch threads per worker: OMP_NUM_THREADS in the server).
Prints one JSON object: the machine (and its load average), the model, and per worker setting
and client count the requests/s, chars/s, median and p95 latency, the Sampler's chars/s and the
ratio; and chars per CPU second of each (the server's whole process group; the bench process
while the Sampler runs), whose ratio moves far less with other jobs' load than chars/s do: it is
the share of the Sampler's chars/s the server would reach on the same cores left to it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch

from charlm import capability, checkpoint
from charlm import tracking as trk
from charlm.config import ModelConfig
from charlm.model import CharLM
from charlm.sample import Sampler
from charlm.vocab import Vocab

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"()-\n"
PROMPT = "The "
TEMPERATURE = 0.8


def register(folder: Path) -> tuple[str, str, CharLM, Vocab]:
    """(tracking URI, models:/ URI, model, vocab) of a random 2x512 LSTM registered in folder."""
    vocab = Vocab.from_text(ALPHABET)
    cfg = ModelConfig(vocab_size=len(vocab), num_layers=2, hidden_size=512, embed_size=64, dropout=0.0)
    torch.manual_seed(0)
    model = CharLM(cfg).eval()
    path = folder / "model.pt"
    checkpoint.save(checkpoint.build(model, cfg, vocab, step=0), path)
    uri, store = f"sqlite:///{folder}/mlflow.db", str(folder / "store")
    with trk.start_run(tracking_uri=uri, store=store, experiment="bench-serve") as run:
        pass
    reg = trk.register_checkpoint(str(path), "bench-serve", run_id=run.run_id, tracking_uri=uri, store=store)
    return uri, reg["model_uri"], model, vocab


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow models serve` in its own process group, on a free loopback port."""

    def __init__(
        self, tracking_uri: str, model_uri: str, workers: int, threads: int | None, log: Path
    ) -> None:
        bin_dir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": tracking_uri,
            "PATH": bin_dir + os.pathsep + os.environ["PATH"],
        }
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    *(str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model_uri),
                    *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)),
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > 180:
                self.stop()
                raise RuntimeError(f"mlflow models serve not ready after 180 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
        self.ready_s = time.monotonic() - t0

    def post(self, payload: dict[str, Any]) -> list[str]:
        req = urllib.request.Request(
            self.url + "/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())["predictions"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.url}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of every process in the server's group (mlflow, uvicorn and
        its workers) so far, from /proc: charged only to what the server ran."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[2]) == self.proc.pid:  # pgrp: the group the server leads
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)


def payload(i: int, a: argparse.Namespace) -> dict[str, Any]:
    params = {"length": a.length, "num_samples": a.num_samples, "seed": i, "temperature": TEMPERATURE}
    return {"inputs": [PROMPT], "params": {**params, "precision": a.precision}}


def through_server(server: Server, clients: int, n: int, a: argparse.Namespace) -> dict[str, Any]:
    """n requests from `clients` threads (each takes the next request until none is left)."""
    todo = list(range(n))
    lock = threading.Lock()
    latencies: list[float] = []
    chars = [0]
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            t0 = time.perf_counter()
            try:
                texts = server.post(payload(i, a))
            except Exception as e:
                errors.append(str(e))
                return
            took = time.perf_counter() - t0
            with lock:
                latencies.append(took)
                chars[0] += sum(len(t) for t in texts)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = server.cpu_seconds() - cpu0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, first: {errors[0]}")
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(lat),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(lat) / wall, 3),
        "chars_per_s": round(chars[0] / wall, 1),
        "chars_per_cpu_s": round(chars[0] / max(cpu, 1e-9), 1),
        "latency_p50_s": round(statistics.median(lat), 3),
        "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
    }


class Direct:
    """The same requests on the Sampler in this process, one generate() per request."""

    def __init__(self, model: CharLM, vocab: Vocab, a: argparse.Namespace) -> None:
        self.a = a
        self.last_cpu = 0.0
        self.sampler = Sampler(model, vocab, precision=a.precision, max_batch=a.num_samples)
        self.in_thread(lambda: self.generate([PROMPT] * a.num_samples, -1))  # warm-up
        self.streams = a.num_samples * max(a.clients)
        self.big = Sampler(model, vocab, precision=a.precision, max_batch=self.streams)

    def generate(self, prompts: list[str], seed: int, sampler: Sampler | None = None) -> int:
        texts = (sampler or self.sampler).generate(prompts, self.a.length, seed=seed, temperature=TEMPERATURE)
        return sum(len(t) for t in texts)

    def in_thread(self, work: Callable[[], int]) -> tuple[int, float]:
        """(chars, seconds) of work() run in a new thread, as the scoring server runs predict: on
        a loaded machine torch's OpenMP threads ran up to 20x slower from the main thread. The
        process's CPU seconds meanwhile go to self.last_cpu."""
        got: list[tuple[int, float]] = []

        def run() -> None:
            t0 = time.perf_counter()
            chars = work()
            got.append((chars, time.perf_counter() - t0))

        cpu0 = time.process_time()  # this process: the thread and torch's threads (clients idle)
        t = threading.Thread(target=run)
        t.start()
        t.join()
        self.last_cpu = time.process_time() - cpu0
        return got[0]

    def requests(self, n: int) -> dict[str, Any]:
        chars, wall = self.in_thread(
            lambda: sum(self.generate([PROMPT] * self.a.num_samples, i) for i in range(n))
        )
        return {
            "requests": n,
            "requests_per_s": round(n / wall, 3),
            "chars_per_s": round(chars / wall, 1),
            "chars_per_cpu_s": round(chars / max(self.last_cpu, 1e-9), 1),
        }

    def one_batch(self) -> dict[str, Any]:
        """Every stream of the largest round at once: what batching across requests could reach."""
        chars, wall = self.in_thread(lambda: self.generate([PROMPT] * self.streams, 0, self.big))
        return {"streams": self.streams, "chars_per_s": round(chars / wall, 1)}


def measure(server: Server, direct: Direct, clients: int, a: argparse.Namespace) -> dict[str, Any]:
    """Rounds of (the requests on the Sampler, the same requests through the server), so both
    see the same load on a shared machine; medians over the rounds."""
    n = a.requests if clients > 1 else max(1, a.requests // 4)
    rounds = []
    for _ in range(a.rounds):
        ref = direct.requests(n)
        got = through_server(server, clients, n, a)
        rounds.append(
            {
                **got,
                "sampler_chars_per_s": ref["chars_per_s"],
                "ratio": got["chars_per_s"] / ref["chars_per_s"],
                "sampler_chars_per_cpu_s": ref["chars_per_cpu_s"],
                "cpu_ratio": got["chars_per_cpu_s"] / ref["chars_per_cpu_s"],
            }
        )

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 3)

    return {
        "clients": clients,
        "requests_per_round": n,
        "rounds": a.rounds,
        "requests_per_s": med("requests_per_s"),
        "chars_per_s": med("chars_per_s"),
        "latency_p50_s": med("latency_p50_s"),
        "latency_p95_s": med("latency_p95_s"),
        "sampler_chars_per_s": med("sampler_chars_per_s"),
        "ratio_to_sampler": med("ratio"),
        "ratio_per_round": [round(r["ratio"], 3) for r in rounds],
        "chars_per_cpu_s": med("chars_per_cpu_s"),
        "sampler_chars_per_cpu_s": med("sampler_chars_per_cpu_s"),
        "cpu_ratio": med("cpu_ratio"),
        "cpu_ratio_per_round": [round(r["cpu_ratio"], 3) for r in rounds],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=64, help="characters per sample (default %(default)s)")
    p.add_argument("--num-samples", type=int, default=8, help="streams per request (default %(default)s)")
    p.add_argument("--requests", type=int, default=32, help="requests per round at >1 client, a quarter at 1")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per measurement (default 2)")
    p.add_argument(
        "--clients", type=int, nargs="+", default=[1, 32], help="concurrent clients (default 1 32)"
    )
    p.add_argument("--workers", nargs="+", default=["1", "2"], help="server workers, W or WxT (default 1 2)")
    p.add_argument("--precision", default="auto", help="sampling precision (default %(default)s)")
    a = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="charlm-bench-serve-"))
    try:
        uri, model_uri, model, vocab = register(folder)
        direct = Direct(model, vocab, a)
        runs = []
        for spec in a.workers:
            w, _, t = spec.partition("x")
            server = Server(uri, model_uri, int(w), int(t) if t else None, folder / f"serve-{spec}.log")
            try:
                server.post(payload(-1, a))  # warm-up: the worker's Sampler is built
                for clients in a.clients:
                    r = measure(server, direct, clients, a)
                    runs.append({"workers": int(w), "threads_per_worker": int(t) if t else None, **r})
                    print(json.dumps(runs[-1]), file=sys.stderr)
            finally:
                server.stop()
        out = {
            "bench": "serve",
            "machine": {**capability.machine_info(), "load_avg_at_end": os.getloadavg()},
            "model": "2x512 LSTM, random init (speed does not depend on the weights), "
            f"vocab {len(vocab)}, registered pyfunc served by mlflow models serve --env-manager local",
            "request": {"prompt": PROMPT, "length": a.length, "num_samples": a.num_samples},
            "sampler": {
                "precision": direct.sampler.precision,
                "int8_kernel": direct.sampler.int8_kernel,
                "one_batch": direct.one_batch(),
            },
            "server": runs,
        }
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
