"""tpm: timestep policies for text-to-image diffusion and flow models.

Core package: time fields, the policy interface, backbone adapters with per-token time, and
the one sampler loop. It does not import ``policies`` or ``rewards`` (they import ``tpm``); only the
application layer on top, :mod:`tpm.app` (the command line, :func:`compare`, the training run), does.
``import tpm`` alone loads nothing else: the names below are imported on first use.
``docs/ARCHITECTURE.md`` has the whole layout.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["Action", "Policy", "PolicyError", "SampleOutput", "State", "StepOutput", "Trajectory", "compare",
           "sample", "to_scheduler"]


def compare(*args, **kwargs):
    """Compare policies on a prompt set with the same seeds: the Python twin of ``tpm compare``.

    See :func:`tpm.app.cli.compare` for the arguments. Imported on first use because it turns names
    into ``policies`` and ``rewards`` objects, packages that depend on ``tpm``.
    """
    from tpm.app.cli import compare as _compare

    return _compare(*args, **kwargs)


def to_scheduler(pipe, policy, num_inference_steps, **kwargs):
    """``policy`` as a diffusers scheduler for ``pipe``: ``pipe.scheduler = tpm.to_scheduler(pipe, policy, K)``
    makes ``pipe(prompt, num_inference_steps=K)`` reproduce ``tpm.sample`` with the policy.

    See :func:`tpm.schedulers.to_scheduler` (imported on first use: it loads diffusers' scheduler classes).
    """
    from tpm.schedulers import to_scheduler as _to_scheduler

    return _to_scheduler(pipe, policy, num_inference_steps, **kwargs)


# The public names, imported on first use: ``import tpm`` (which every ``tpm.x`` import runs first)
# stays light, so a reward server importing ``tpm.testbed`` does not load the sampler.
_POLICY_NAMES = ("Action", "Policy", "PolicyError", "State")
_SAMPLER_NAMES = ("SampleOutput", "StepOutput", "Trajectory", "sample")


def __getattr__(name):
    if name in _POLICY_NAMES:
        from tpm import policy

        return getattr(policy, name)
    if name in _SAMPLER_NAMES:
        from tpm import sampler

        return getattr(sampler, name)
    # ``tpm.schedulers`` without importing it first (``pipe.scheduler = tpm.schedulers.from_pretrained(DIR)``).
    if name == "schedulers":
        return importlib.import_module("tpm.schedulers")
    raise AttributeError(f"module 'tpm' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_POLICY_NAMES, *_SAMPLER_NAMES, "schedulers"})
