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
           "sample", "to_scheduler"]


def compare(*args, **kwargs):
    """Compare policies on a prompt set with the same seeds: the Python twin of ``tpm compare``.

    See :func:`tpm.cli.compare` for the arguments. Imported on first use because it turns names
    into ``policies`` and ``rewards`` objects, packages that depend on ``tpm``.
    """
    from tpm.cli import compare as _compare

    return _compare(*args, **kwargs)


def to_scheduler(pipe, policy, num_inference_steps, **kwargs):
    """``policy`` as a diffusers scheduler for ``pipe``: ``pipe.scheduler = tpm.to_scheduler(pipe, policy, K)``
    makes ``pipe(prompt, num_inference_steps=K)`` reproduce ``tpm.sample`` with the policy.

    See :func:`tpm.schedulers.to_scheduler` (imported on first use: it loads diffusers' scheduler classes).
    """
    from tpm.schedulers import to_scheduler as _to_scheduler

    return _to_scheduler(pipe, policy, num_inference_steps, **kwargs)


def __getattr__(name):
    # ``tpm.schedulers`` without importing it first (``pipe.scheduler = tpm.schedulers.from_pretrained(DIR)``).
    if name == "schedulers":
        import importlib

        return importlib.import_module("tpm.schedulers")
    raise AttributeError(f"module 'tpm' has no attribute {name!r}")
