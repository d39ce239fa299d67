"""Pure tensor math of DDPO: reverse-step Gaussians and log-probs, losses, advantage normalisation."""

from ddpo.core.advantages import PerPromptStatTracker, global_normalize
from ddpo.core.ddim import (
    StepOutput,
    ddim_alphas,
    ddim_step,
    ddpm_step,
    gaussian_kl,
    gaussian_log_prob,
    predicted_original_and_epsilon,
)
from ddpo.core.losses import (
    approx_kl,
    clip_advantages,
    clip_fraction,
    ppo_clip_loss,
    reinforce_loss,
    rwr_weights,
    sparse_rwr_weights,
    weighted_log_likelihood_loss,
)

__all__ = [
    "PerPromptStatTracker",
    "StepOutput",
    "approx_kl",
    "clip_advantages",
    "clip_fraction",
    "ddim_alphas",
    "ddim_step",
    "ddpm_step",
    "gaussian_kl",
    "gaussian_log_prob",
    "global_normalize",
    "ppo_clip_loss",
    "predicted_original_and_epsilon",
    "reinforce_loss",
    "rwr_weights",
    "sparse_rwr_weights",
    "weighted_log_likelihood_loss",
]
