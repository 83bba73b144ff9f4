"""tpm: timestep policies for text-to-image diffusion and flow models.

Core package: time fields, the policy interface, backbone adapters with per-token time, and
the one sampler loop. It does not import ``policies`` or ``rewards`` (they import ``tpm``); only the
wiring modules do, :mod:`tpm.cli` (names -> objects for the command line and :func:`compare`) and
the training entry point ``tpm.train``. ``docs/ARCHITECTURE.md`` has the whole layout.
"""

from tpm.policy import Action, Policy, PolicyError, State
from tpm.sampler import SampleOutput, StepOutput, Trajectory, sample

__version__ = "0.1.0"
__all__ = ["Action", "Policy", "PolicyError", "SampleOutput", "State", "StepOutput", "Trajectory", "compare",
           "sample"]


def compare(*args, **kwargs):
    """Compare policies on a prompt set with the same seeds: the Python twin of ``tpm compare``.

    See :func:`tpm.cli.compare` for the arguments. Imported on first use because it turns names
    into ``policies`` and ``rewards`` objects, packages that depend on ``tpm``.
    """
    from tpm.cli import compare as _compare

    return _compare(*args, **kwargs)
