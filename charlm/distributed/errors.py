"""The errors of charlm.distributed, shared by its modules."""

from __future__ import annotations

from charlm.errors import first_line as first_line  # re-exported: one definition, shared with tracking


class DistributedTrainingError(RuntimeError):
    """A distributed run failed or cannot start; the message names the run and what to do."""


class RunExistsError(DistributedTrainingError):
    pass


class RunNotFoundError(DistributedTrainingError):
    pass
