"""tpm: timestep policies for text-to-image diffusion and flow models.

Core package: time fields, the policy interface, backbone adapters with per-token time, and
the one sampler loop. It imports neither ``policies`` nor ``rewards``.
"""

from tpm.policy import Action, Policy, PolicyError, State
from tpm.sampler import SampleOutput, Trajectory, sample

__version__ = "0.1.0"
__all__ = ["Action", "Policy", "PolicyError", "SampleOutput", "State", "Trajectory", "sample"]
