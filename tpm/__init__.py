"""tpm: timestep policies for text-to-image diffusion and flow models.

Core package: time fields, the policy interface, backbone adapters with per-token time, and
the one sampler loop. It imports neither ``policies`` nor ``rewards``.
"""

from tpm.policy import Action, Policy, PolicyError, State
from tpm.sampler import SampleOutput, Trajectory, sample

__version__ = "0.1.0"
__all__ = ["Action", "Policy", "PolicyError", "SampleOutput", "State", "Trajectory", "compare", "sample"]


def compare(*args, **kwargs):
    """Compare policies on a prompt set with the same seeds: the Python twin of ``tpm compare``.

    See :func:`tpm.comparison.compare` for the arguments. Imported on first use because it wires
    ``policies`` and ``rewards`` (which depend on ``tpm``) and loads ``datasets``.
    """
    from tpm.comparison import compare as _compare

    return _compare(*args, **kwargs)
