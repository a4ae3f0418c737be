"""Diffusion maths (METHOD.md §2-§4): schedules, respacing, posteriors, losses. Pure functions."""

from diffad_core.diffusion.gaussian import (
    discretized_gaussian_log_likelihood,
    kl_map_bits,
    model_timesteps,
    normal_kl,
    p_mean_variance,
    predict_x0_from_eps,
    q_posterior,
    q_sample,
    reverse_step,
    training_losses,
    vb_terms_bits,
)
from diffad_core.diffusion.schedule import (
    Schedule,
    diffusion_schedules,
    linear_schedule,
    respace,
    schedule_from_betas,
    space_timesteps,
)

__all__ = [
    "Schedule",
    "diffusion_schedules",
    "discretized_gaussian_log_likelihood",
    "kl_map_bits",
    "linear_schedule",
    "model_timesteps",
    "normal_kl",
    "p_mean_variance",
    "predict_x0_from_eps",
    "q_posterior",
    "q_sample",
    "respace",
    "reverse_step",
    "schedule_from_betas",
    "space_timesteps",
    "training_losses",
    "vb_terms_bits",
]
