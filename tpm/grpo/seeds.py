"""Named seed streams: every random draw of a GRPO run is seeded from (run seed, stream, indices).

Seeding each draw from its own coordinates, instead of advancing one generator, is what makes a
resumed run continue exactly as the uninterrupted one: iteration i's prompts, noises, action
draws and minibatch order do not depend on what ran before it. Indices are global (the sample's
place in the whole batch, never a process index), so a run's draws do not depend on how many
processes share it either. The stream numbers are part of
the reproducibility contract (a run's numbers depend on them), so they never change.
"""

from __future__ import annotations

from enum import IntEnum


class Stream(IntEnum):
    """What a seed is for; the value enters the hash."""

    NOISE = 1  # (iteration, sample index): the initial noise of a training rollout
    # 2 was (iteration, process index): action draws per process, which made a run depend on the process count
    SHARED_ACTIONS = 4  # (iteration): torch's global generator during rollouts, for policies without per-sample draws
    ACTIONS = 8  # (iteration, sample index): the policy's action draws for one sample of a rollout
    SHUFFLE = 3  # (iteration, epoch): minibatch order of the update
    EVAL_NOISE = 5  # (sample index): the initial noise of held-out evaluation images
    PROMPT_ORDER = 7  # (pass over the training prompts): their shuffled order


def seed_for(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and integers (a :class:`Stream`, then indices)."""
    h = int(seed) & 0xFFFFFFFF
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return h
