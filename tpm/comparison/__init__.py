"""Compare timestep policies on one prompt set with the same seeds (``tpm compare``, ``tpm.compare``).

Modules: :mod:`~tpm.comparison.runner` (the engine: images and scores, cached and resumable),
:mod:`~tpm.comparison.api` (a whole comparison on objects: engine then outputs),
:mod:`~tpm.comparison.stats` (intervals), :mod:`~tpm.comparison.report` and
:mod:`~tpm.comparison.figures` (outputs). Everything here takes objects (a pipeline, policies,
reward callables); names are turned into objects by :mod:`tpm.app.cli`, and prompt sets are loaded by
:mod:`tpm.loading`.
"""

from tpm.comparison.api import ComparisonResult, run_comparison, seed_list, write_outputs
from tpm.comparison.report import PolicySummary
from tpm.comparison.runner import CompareError, RunSpec, run
from tpm.comparison.stats import Interval, bootstrap_mean, paired_bootstrap

__all__ = [
    "CompareError", "ComparisonResult", "Interval", "PolicySummary", "RunSpec", "bootstrap_mean",
    "paired_bootstrap", "run", "run_comparison", "seed_list", "write_outputs",
]
