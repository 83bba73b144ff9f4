"""GRPO for timestep policies with frozen backbones (AsyncDiff §3.3).

Small pieces, one job each: ``config`` (the typed run configuration), ``seeds`` (named seed
streams), ``reward`` (the reward contract), ``rollout`` (sampling that records decisions),
``advantages`` and ``loss`` (the maths), ``checkpoint`` (run folders, exact resume), ``evaluation``
(held-out scores on fixed noises), wired by ``trainer``. ``tpm.grpo`` imports neither ``policies``
nor ``rewards``: the application layer (:mod:`tpm.app.train`, which ``tpm train`` and the scripts in
``recipes/`` call) builds those objects and passes them in.
"""

from tpm.grpo.advantages import advantage_stats, group_advantages
from tpm.grpo.config import GRPOConfig, GRPOConfigError
from tpm.grpo.evaluation import EvalResult, evaluate
from tpm.grpo.loss import ppo_clip_loss, trajectory_log_prob
from tpm.grpo.reward import TrainingReward, training_reward
from tpm.grpo.rollout import RolloutBatch, rollout
from tpm.grpo.seeds import Stream, seed_for
from tpm.grpo.trainer import GRPOTrainer, TrainResult

__all__ = [
    "EvalResult", "GRPOConfig", "GRPOConfigError", "GRPOTrainer", "RolloutBatch", "Stream", "TrainResult",
    "TrainingReward", "advantage_stats", "evaluate", "group_advantages", "ppo_clip_loss", "rollout", "seed_for",
    "training_reward", "trajectory_log_prob",
]
