"""Rewards: `reward(images, prompts, metadata) -> RewardOutput`, registered by name or given as
`"package.module:function"`. Importing this package registers the built-in rewards."""

from ddpo.rewards import clip, jpeg, preference, remote, vlm
from ddpo.rewards.base import (
    CheckedReward,
    Reward,
    RewardError,
    RewardOutput,
    WeightedSum,
    available_rewards,
    build_reward,
    build_reward_from_config,
    check_reward,
    checked_reward,
    register_reward,
    score,
)

__all__ = [
    "CheckedReward",
    "Reward",
    "RewardError",
    "RewardOutput",
    "WeightedSum",
    "available_rewards",
    "build_reward",
    "build_reward_from_config",
    "check_reward",
    "checked_reward",
    "clip",
    "jpeg",
    "preference",
    "remote",
    "register_reward",
    "score",
    "vlm",
]
