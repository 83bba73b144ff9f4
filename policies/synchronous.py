"""The synchronous policy: every token on the pipeline's own grid (diffusers' default).

``tpm.sample(pipe, prompt, policy=Synchronous())`` equals ``pipe(prompt)``; it is the
baseline every other policy is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpm.fields import synchronous_next
from tpm.policy import Action, Policy, State, register_policy


@dataclass
class SynchronousConfig:
    pass


@register_policy("synchronous")
class Synchronous(Policy):
    config_class = SynchronousConfig

    def act(self, state: State) -> Action:
        return Action(tau_next=synchronous_next(state))
