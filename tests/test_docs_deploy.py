"""docs/deploy.md, run as written: every `bash` block of its newcomer path (Steps 1-5), in order,
as one script against the local stack (infra/local-stack.sh) on free ports, with small values for the variables the blocks read
(MINUTES, CORPUS_DIR, SERVE_PORT). The doc cannot drift from the code without this failing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from mlflow_fixtures import _free_port

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "deploy.md"


NEWCOMER_PATH_ENDS = "## The store, as it really is"  # later sections: other set-ups, not run


def bash_blocks(markdown: str) -> list[str]:
    """The ```bash fenced blocks of the doc's newcomer path (Steps 1-5), in order."""
    path = markdown.split(NEWCOMER_PATH_ENDS)[0]
    return re.findall(r"^```bash\n(.*?)^```$", path, flags=re.S | re.M)


def test_the_doc_has_the_newcomer_steps() -> None:
    blocks = bash_blocks(DOC.read_text())
    script = "\n".join(blocks)
    for step in (
        "infra/local-stack.sh start",
        'upload "$CORPUS_DIR" s3://charlm/corpora/shakespeare/',
        "prefect --no-prompt deploy --all",
        "prefect deployment run 'retrain/retrain-shakespeare'",
        "mlflow models serve -m models:/shakespeare@champion",
        "/invocations",
        "infra/local-stack.sh stop",
    ):
        assert step in script, step
    prefect_yaml = (ROOT / "prefect.yaml").read_text()
    assert "s3://charlm/corpora/shakespeare/" in prefect_yaml and "team-charlm" not in prefect_yaml


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("curl") is None, reason="the doc's serving step uses curl, not installed here"
)
def test_deploy_doc_runs_end_to_end(tmp_path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "input.txt").write_text(
        "ROMEO: But soft, what light through yonder window breaks?\nJULIET: O Romeo, Romeo!\n" * 4000
    )
    stack = tmp_path / "stack"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING", "AWS_"))
    }
    env.update(
        CHARLM_STACK_DIR=str(stack),
        CHARLM_S3_PORT=str(_free_port()),
        CHARLM_MLFLOW_PORT=str(_free_port()),
        CHARLM_PREFECT_PORT=str(_free_port()),
        CHARLM_PG_PORT=str(_free_port()),
        SERVE_PORT=str(_free_port()),
        MINUTES="0.05",
        CORPUS_DIR=str(corpus),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        RAY_TMPDIR=tempfile.mkdtemp(prefix="cdd-"),
        PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}",
    )
    if _postgres_here():  # the team stack on a database server, where this machine has one
        env["CHARLM_STACK_BACKEND"] = "postgres"
    script = "\n".join(
        [
            "set -euo pipefail",
            # what the reader does by hand when done, also when a step fails
            "trap 'kill $(jobs -p) 2>/dev/null || true; infra/local-stack.sh stop > /dev/null 2>&1 || true' EXIT",
            *bash_blocks(DOC.read_text()),
        ]
    )
    (tmp_path / "deploy.sh").write_text(script)
    res = subprocess.run(
        ["bash", str(tmp_path / "deploy.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500
    )
    tail = f"stdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}"
    assert res.returncode == 0, tail
    assert "uploaded s3://charlm/corpora/shakespeare/more/input.txt" in res.stdout, tail
    assert re.search(r"shakespeare@2", res.stdout), tail  # the retrain ingested the new objects
    assert '{"predictions": ["' in res.stdout, tail  # the served champion answered
    assert not (stack / "s3.pid").exists() or not _alive((stack / "s3.pid").read_text())


def _postgres_here() -> bool:
    """PostgreSQL's server programs (Debian's postgresql package) are installed."""
    return bool(shutil.which("pg_ctl") or list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")))


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True
