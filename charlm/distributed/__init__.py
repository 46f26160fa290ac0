"""Ray Train adapter: charlm's one training loop on N data-parallel workers (the only Ray import).

`train_distributed` runs `charlm.train.train` in every worker of a `TorchTrainer` (DDP; gloo on
CPU, nccl on GPU); the workers differ from `charlm train` only in the `Dist` hooks (all-reduce
based) and in the callbacks they pass (a Ray reporter on every rank, plus the caller's).

Data: every rank opens the dataset version from the store itself (a raw local corpus is encoded
once by the driver and shipped through Ray's object store) and takes its own contiguous streams:
the global batch is `batch_size` streams per rank x N ranks, laid out exactly like one process
with `batch_size * N` streams (see charlm.data). Ranks never share a stream.

Run folder `<store>/runs/<name>/` (local folder or any fsspec URL, e.g. s3:// with
AWS_ENDPOINT_URL; its files are named and read/written by charlm.runs): `run.json` (parameters,
written before training), Ray's `checkpoint_<step>/checkpoint.pt` (charlm's checkpoint schema,
rank 0, every evaluation; the best by val loss and the latest are kept), `attempts/*.json` (one
per worker-group start, with the step it resumed from), and after success `best.pt`, `last.pt`
and `summary.json` (written last), so `charlm sample <store>/runs/<name>` needs no Ray.

Checkpoints hold the recurrent state of *all* streams (carry of shape (L, B*N, H), gathered from
the ranks), so a restart gives every rank its own state back and continues bit for bit.

Fault tolerance: a worker failure restarts the whole group from the last checkpoint, up to
`max_failures` times. A driver failure: run the same call again. The run name is derived from the
parameters (config, dataset fingerprint, workers), so the same command resumes the same run and
a different one never picks it up; an explicit `run_name` must be new unless `resume=True`.

Ray: local by default (`ray.init` in-process, in the main thread, dashboard and usage stats off);
with RAY_ADDRESS set, the same code joins that cluster.

Modules: session (Ray start-up, loopback, resources), dataspec (what the workers read), worker
(the loop in each worker), driver (run names, the run folder, TorchTrainer, publishing),
generation (charlm.genjob's executor on Ray actors), errors.
"""

from charlm.distributed.dataspec import DataSpec, resolve_data
from charlm.distributed.driver import derive_run_name, train_distributed
from charlm.distributed.errors import DistributedTrainingError, RunExistsError, RunNotFoundError
from charlm.distributed.generation import generate_on_ray
from charlm.distributed.session import ensure_ray
from charlm.runs import check_run_name, run_url, runs_root

__all__ = [
    "DataSpec",
    "DistributedTrainingError",
    "RunExistsError",
    "RunNotFoundError",
    "check_run_name",
    "derive_run_name",
    "ensure_ray",
    "generate_on_ray",
    "resolve_data",
    "run_url",
    "runs_root",
    "train_distributed",
]
