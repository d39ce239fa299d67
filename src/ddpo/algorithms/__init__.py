"""Training algorithms, by registry name: one module per algorithm, each implementing `Algorithm`."""

from typing import Any

from ddpo.algorithms.awm import AdvantageWeightedMatching
from ddpo.algorithms.base import Algorithm, LossOutput, MicroBatch, OffPolicyError, check_on_policy, regularizers_from_config
from ddpo.algorithms.ddpo import DDPOImportanceSampling, DDPOScoreFunction
from ddpo.algorithms.diffusion_nft import DiffusionNFT
from ddpo.algorithms.fdfo import FiniteDifferenceFlowOptimization
from ddpo.algorithms.flow_grpo import FlowGRPO, GRPOGuard
from ddpo.algorithms.mix_grpo import MixGRPO
from ddpo.algorithms.rwr import RewardWeightedRegression, SparseRewardWeightedRegression

ALGORITHMS: dict[str, type[Algorithm]] = {
    "ddpo_is": DDPOImportanceSampling,
    "ddpo_sf": DDPOScoreFunction,
    "rwr": RewardWeightedRegression,
    "rwr_sparse": SparseRewardWeightedRegression,
    "flow_grpo": FlowGRPO,
    "grpo_guard": GRPOGuard,
    "mix_grpo": MixGRPO,
    "fdfo": FiniteDifferenceFlowOptimization,
    "diffusion_nft": DiffusionNFT,
    "awm": AdvantageWeightedMatching,
}


def build_algorithm(name: str, **kwargs: Any) -> Algorithm:
    """Instantiate the algorithm registered as `name` with its constructor's keyword arguments."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid names: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](**kwargs)


def build_algorithm_from_config(train: Any) -> Algorithm:
    """The algorithm named by `train.algorithm`, configured from the rest of the `train` section, with the
    regularizers it asks for."""
    if train.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {train.algorithm!r}; valid names: {', '.join(ALGORITHMS)}")
    algorithm = ALGORITHMS[train.algorithm].from_config(train)
    algorithm.regularizers = regularizers_from_config(train)
    return algorithm


__all__ = [
    "ALGORITHMS",
    "AdvantageWeightedMatching",
    "Algorithm",
    "DDPOImportanceSampling",
    "DDPOScoreFunction",
    "DiffusionNFT",
    "FiniteDifferenceFlowOptimization",
    "FlowGRPO",
    "GRPOGuard",
    "LossOutput",
    "MicroBatch",
    "MixGRPO",
    "OffPolicyError",
    "check_on_policy",
    "RewardWeightedRegression",
    "SparseRewardWeightedRegression",
    "build_algorithm",
    "build_algorithm_from_config",
]
