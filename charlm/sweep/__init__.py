"""Sweeps: Ray Tune over TrainConfig's fields, one MLflow parent run with a child run per trial,
the comparison of the trials, and the winner registered (adapter over Ray Tune and MLflow).

Modules: space (the search space: file or --grid, checked before anything starts), trial (the
trainable: charlm.train.train reporting to Tune and logging to the trial's child run), driver
(the Tuner, the sweep folder in the store, resuming), report (trials as records, the comparison
PNG and table), tracking (the parent run, ending the children, registering the winner).
"""

from charlm.sweep.driver import SCHEDULERS, SweepError, derive_sweep_name, run_sweep, sweep_folder
from charlm.sweep.space import Space, SpaceError, grid_space, load_space, merge, parse_space

__all__ = [
    "SCHEDULERS",
    "Space",
    "SpaceError",
    "SweepError",
    "derive_sweep_name",
    "grid_space",
    "load_space",
    "merge",
    "parse_space",
    "run_sweep",
    "sweep_folder",
]
