"""GRPO for timestep policies with frozen backbones (SPEC §2; AsyncDiff §3.3).

Small pure pieces (``config``, ``rollout``, ``advantages``, ``loss``) wired by ``trainer``.
``tpm.grpo`` imports neither ``policies`` nor ``rewards``: recipes pass those objects in.
"""

from tpm.grpo.advantages import advantage_stats, group_advantages
from tpm.grpo.config import GRPOConfig, GRPOConfigError
from tpm.grpo.loss import beta_kl, ppo_clip_loss, trajectory_log_prob
from tpm.grpo.rollout import RolloutBatch, rollout
from tpm.grpo.trainer import GRPOTrainer, TrainResult, seed_for

__all__ = [
    "GRPOConfig", "GRPOConfigError", "GRPOTrainer", "RolloutBatch", "TrainResult", "advantage_stats",
    "beta_kl", "group_advantages", "ppo_clip_loss", "rollout", "seed_for", "trajectory_log_prob",
]
