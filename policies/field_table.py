"""A state-free table in the field policy's action space: one fixed value per action part and step.

The learned field policy (:mod:`policies.field`) decides at step k of K a grid move, per-token
offsets and a conditioning shift, each a value ``d`` in [-1, 1], from the sampler's state. A *table*
fixes them in advance: ``table = {"grid": [d_0, ..., d_{K-1}], "cond": [...], "offset": [...]}``, the
same for every prompt and noise (0 everywhere, or a part left out, is the synchronous sampler; the
grid move and offset of the last step are ignored, as in the policy). The values act through the
field policy's own maps (:func:`policies.field.apply_action`), so a table obeys the same
constraints and is a point of the very action space GRPO searches.

Such a table is what ``tpm search`` finds by coordinate search on val prompts
(:mod:`tpm.table_search`): the best prompt-independent schedule a learned field policy has to beat.
Saved as ``config.json`` (the field policy's geometry and the table), it loads with
``policies.load(dir)`` and serves as a baseline row (``baselines: {label: {policy: DIR}}``) or as the
fixed policy a field policy imitates before GRPO (``warm_start: {policy: DIR}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from policies.field import PARTS, FieldConfig, apply_action, check_grid
from tpm.policy import Action, Policy, PolicyError, RunContext, State, register_policy


@dataclass
class FieldTableConfig(FieldConfig):
    """The field policy's config (only its geometry acts: grid, patch, max_disparity, cond_range,
    sigma_min) and ``table``: action part -> one value d in [-1, 1] per step."""

    table: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.table, dict) or not self.table:
            raise PolicyError("field_table: table must map action parts (grid, offset, cond) to one value per step")
        unknown = sorted(set(self.table) - set(PARTS))
        if unknown:
            raise PolicyError(f"field_table: unknown action parts {unknown}; the parts are {list(PARTS)}")
        lengths = {len(v) for v in self.table.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise PolicyError(f"field_table: every part needs one value per step, the same count; got "
                              f"{ {k: len(v) for k, v in self.table.items()} }")
        for part, values in self.table.items():
            bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and -1 <= v <= 1)]
            if bad:
                raise PolicyError(f"field_table: {part} values must lie in [-1, 1], got {bad}")
        self.table = {k: [float(v) for v in vals] for k, vals in self.table.items()}

    @property
    def steps(self) -> int:
        return len(next(iter(self.table.values())))


@register_policy("field_table")
class FieldTable(Policy):
    """A fixed per-step table of the field policy's actions; see the module docstring."""

    paper = "a fixed schedule in the learned field policy's action space (AYS / OSS-style schedule search)"
    config_class = FieldTableConfig

    @classmethod
    def like(cls, policy, table: dict[str, list[float]]) -> FieldTable:
        """A table with the geometry of field policy (or field config) ``policy``."""
        from dataclasses import asdict

        cfg = policy.config if hasattr(policy, "config") else policy
        return cls(**{**asdict(cfg), "table": {k: list(v) for k, v in table.items()}})

    def begin(self, ctx: RunContext) -> dict:
        check_grid(self.config, ctx, "field table")
        if ctx.num_steps != self.config.steps:
            raise PolicyError(f"this field table holds {self.config.steps} steps, but the run has {ctx.num_steps}: "
                              f"sample with num_inference_steps={self.config.steps}, or search a table for "
                              f"{ctx.num_steps} steps")
        return {}

    def act(self, state: State) -> Action:
        cfg = self.config
        b, dev = state.batch_size, state.tau.device
        shapes = {"grid": (b,), "offset": (b, *cfg.groups), "cond": (b, *cfg.groups)}
        action = {part: torch.full(shapes[part], (values[state.step] + 1) / 2, device=dev)
                  for part, values in cfg.table.items()}
        tau_next, tau_cond, centre = apply_action(cfg, state, action)
        state.memory["centre"] = centre
        return Action(tau_next=tau_next, tau_cond=tau_cond)
