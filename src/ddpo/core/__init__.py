"""Pure tensor math of DDPO and its successors: reverse-step Gaussians and log-probs (DDIM, flow SDE, churned
Euler), losses, advantage normalisation, FDFO's finite differences, the forward-process losses of DiffusionNFT
and AWM."""

from ddpo.core.advantages import PerPromptStatTracker, global_normalize, group_normalize
from ddpo.core.ddim import (
    StepOutput,
    ddim_alphas,
    ddim_step,
    ddpm_step,
    gaussian_kl,
    gaussian_log_prob,
    predicted_original_and_epsilon,
)
from ddpo.core.finite_difference import endpoint_directions, pair_reward_differences, velocity_log_likelihood
from ddpo.core.flow import churn_noise, churn_step, euler_step, flow_sigmas, sde_std, sde_step
from ddpo.core.forward_process import (
    adaptive_matching_loss,
    awm_log_likelihood,
    flow_matching_target,
    noised,
    nft_implicit_velocities,
    nft_loss,
    nft_optimality,
    velocity_divergence,
)
from ddpo.core.losses import (
    approx_kl,
    clip_advantages,
    clip_fraction,
    normalized_log_ratio,
    ppo_clip_loss,
    reinforce_loss,
    rwr_weights,
    sparse_rwr_weights,
    spo_loss,
    weighted_log_likelihood_loss,
)

__all__ = [
    "PerPromptStatTracker",
    "StepOutput",
    "adaptive_matching_loss",
    "approx_kl",
    "awm_log_likelihood",
    "churn_noise",
    "churn_step",
    "clip_advantages",
    "clip_fraction",
    "ddim_alphas",
    "ddim_step",
    "ddpm_step",
    "endpoint_directions",
    "euler_step",
    "flow_matching_target",
    "flow_sigmas",
    "gaussian_kl",
    "gaussian_log_prob",
    "global_normalize",
    "group_normalize",
    "nft_implicit_velocities",
    "nft_loss",
    "nft_optimality",
    "noised",
    "normalized_log_ratio",
    "pair_reward_differences",
    "ppo_clip_loss",
    "predicted_original_and_epsilon",
    "reinforce_loss",
    "rwr_weights",
    "sde_std",
    "sde_step",
    "sparse_rwr_weights",
    "spo_loss",
    "velocity_divergence",
    "velocity_log_likelihood",
    "weighted_log_likelihood_loss",
]
