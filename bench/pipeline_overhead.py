"""The pipeline's overhead: everything `charlm pipeline` does besides its training steps
(Prefect, ingest, Ray start-up, MLflow, registration, evaluation, generation), measured.

Each round runs `charlm pipeline` end to end in a fresh store on a small corpus and a small model
(the steps take a few seconds), and subtracts the training steps' own time (steps x B x T over
the run's chars/s) from the wall time. Three rounds:
- `first`: charlm's local Prefect server is not up yet (this command starts it);
- `reused`: the server the first round started is reused (what every later command pays);
- `ephemeral` (the reference): Prefect's temporary server per command
  (CHARLM_PREFECT_SERVER=ephemeral), which charlm used before.
Target: reused overhead <= 20 s. Prints one JSON object with the machine it ran on.

    .venv/bin/python bench/pipeline_overhead.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charlm.capability import machine_info

BIN = Path(sys.executable).parent


def _round(tmp: Path, label: str, env: dict[str, str], steps: int) -> dict[str, float | str]:
    store = tmp / f"store-{label}"
    corpus = tmp / "corpus.txt"
    argv = [
        str(BIN / "charlm"), "pipeline", str(corpus), "--name", f"bench-{label}", "--store", str(store),
        "--workers", "1", "--max-steps", str(steps), "--eval-every", str(steps), "--num-layers", "1",
        "--hidden-size", "64", "--batch-size", "16", "--seq-len", "50", "--length", "50",
        "--num-samples", "1", "--json",
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{label}: charlm pipeline failed: {res.stderr.strip().splitlines()[-1:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    t = out["trained"]
    train_s = t["steps"] * 16 * 50 / t["chars_per_s"]
    return {"round": label, "wall_s": round(wall, 2), "train_steps_s": round(train_s, 2),
            "overhead_s": round(wall - train_s, 2)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="charlm-bench-pipeline-"))
    text = Path(json.__file__).read_text() * 40  # ~0.5 MB of Python source
    (tmp / "corpus.txt").write_text(text)
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    base.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0", MLFLOW_ENABLE_TELEMETRY="false"
    )
    local = {**base, "PREFECT_HOME": str(tmp / "prefect-local")}
    eph = {**base, "PREFECT_HOME": str(tmp / "prefect-ephemeral"), "CHARLM_PREFECT_SERVER": "ephemeral"}
    rounds = []
    try:
        rounds.append(_round(tmp, "first", local, a.steps))
        rounds.append(_round(tmp, "reused", local, a.steps))
        rounds.append(_round(tmp, "ephemeral", eph, a.steps))
    finally:
        subprocess.run([str(BIN / "charlm"), "server", "stop"], env=local, capture_output=True, timeout=60)
    by = {r["round"]: r for r in rounds}
    print(
        json.dumps(
            {
                "bench": "pipeline_overhead",
                "rounds": rounds,
                "reused_overhead_s": by["reused"]["overhead_s"],
                "target_s": 20,
                "ratio_vs_ephemeral": round(by["reused"]["overhead_s"] / by["ephemeral"]["overhead_s"], 3),
                "machine": machine_info(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
