"""docs/distributed.md's end-to-end block, run as written on a real two-node Ray cluster
(infra/ray-cluster.sh) on this machine: `ray job submit` of a training, a driver joining through
RAY_ADDRESS, and `charlm pipeline` (Prefect) training and generating on the cluster."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from mlflow_fixtures import _free_port

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "distributed.md"


def recipe() -> str:
    """The bash block that starts the cluster and ends by stopping it."""
    blocks = re.findall(r"^```bash\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)
    found = [b for b in blocks if b.startswith("infra/ray-cluster.sh start 1") and "charlm pipeline" in b]
    assert len(found) == 1, "docs/distributed.md: the end-to-end block is missing"
    return found[0]


@pytest.mark.slow
def test_distributed_doc_recipe_runs_on_a_two_node_cluster(tmp_path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "input.txt").write_text("First Citizen: Before we proceed any further, hear me speak.\n" * 3000)
    store = tmp_path / "store"
    ray_dir = tempfile.mkdtemp(prefix="cdr-")  # short: Ray's socket paths live below it
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "PREFECT_API", "MLFLOW_TRACKING"))
    }
    base = 20000 + 100 * (os.getpid() % 80)
    env.update(
        CHARLM_STORE=str(store),
        CHARLM_RAY_DIR=ray_dir,
        CHARLM_RAY_PORT=str(_free_port()),
        CHARLM_RAY_DASHBOARD_PORT=str(_free_port()),
        CHARLM_RAY_CLIENT_PORT=str(_free_port()),
        CHARLM_RAY_PORT_BASE=str(base),
        CORPUS_DIR=str(corpus),
        MINUTES="0.05",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}",
    )
    script = "\n".join(
        [
            "set -euo pipefail",
            "trap 'infra/ray-cluster.sh stop > /dev/null 2>&1 || true; charlm server stop > /dev/null 2>&1 || true' EXIT",
            recipe(),
        ]
    )
    (tmp_path / "recipe.sh").write_text(script)
    res = subprocess.run(
        ["bash", str(tmp_path / "recipe.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500
    )
    tail = f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    assert res.returncode == 0, tail
    assert "succeeded" in res.stdout + res.stderr, tail  # the submitted job
    runs = sorted(p for p in (store / "runs").iterdir() if p.is_dir())
    # the job's run and the driver's (another seed); the pipeline, with the job's data and config,
    # found the job's run finished and registered it instead of training it again
    assert len(runs) == 2 and all((r / "summary.json").is_file() for r in runs), tail
    assert "model shakespeare version 1: trained and registered" in res.stderr, tail
    nodes = set()
    for f in glob.glob(str(store / "runs" / "*" / "attempts" / "*.json")):
        nodes.update(json.loads(Path(f).read_text()).get("nodes") or [])
    assert len(nodes) == 2, nodes  # the ranks ran on both nodes of the cluster
