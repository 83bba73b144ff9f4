"""Reward models behind one contract: ``reward(images, prompts) -> scores`` (see ``rewards.base``)."""

from rewards.base import (
    RewardError,
    RewardModel,
    load,
    parse_reward_spec,
    register_reward,
    registered_rewards,
    to_pixels,
)

__all__ = ["RewardError", "RewardModel", "load", "parse_reward_spec", "register_reward", "registered_rewards", "to_pixels"]
import rewards.bertscore  # noqa: E402,F401  (registers "bertscore")
import rewards.clip_score  # noqa: E402,F401  (registers "clipscore")
import rewards.composite  # noqa: E402,F401
import rewards.hpsv2  # noqa: E402,F401  (registers "hpsv2")
import rewards.imagereward  # noqa: E402,F401  (registers "imagereward")
import rewards.pickscore  # noqa: E402,F401  (registers "pickscore")
import rewards.remote  # noqa: E402,F401  (registers "remote")
import rewards.testbed  # noqa: E402,F401  (registers "testbed")
import rewards.vlm_judge  # noqa: E402,F401  (registers "vlm_judge")
from rewards.composite import Composite, CompositeResult, combine  # noqa: E402,F401
