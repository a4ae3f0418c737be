"""Gaussian diffusion maths as pure tensor functions (METHOD.md §2, §3, §4).

Conventions: ``s`` is a :class:`~diffad_core.diffusion.schedule.Schedule`; ``t`` is a long
tensor (B,) of indices INTO ``s`` (for a respaced schedule, respaced indices; the UNet is fed
``s.timestep_map[t]``, the original step). Coefficients are looked up in float64 and cast to
the input's dtype and device. The model output has ``2C`` channels with a learned variance
(eps, v) or ``C`` channels (eps only, fixed variance).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from diffad_core.diffusion.schedule import Schedule

_LN2 = math.log(2.0)


def _extract(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``coef[t]`` as (B, 1, ..., 1) in ``like``'s dtype/device (float64 lookup, then cast)."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},), got {tuple(t.shape)}")
    values = coef[t.detach().to("cpu", torch.int64)]
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def model_timesteps(s: Schedule, t: torch.Tensor) -> torch.Tensor:
    """The original-chain steps to feed the UNet for indices ``t`` into ``s`` (METHOD.md §3)."""
    return s.timestep_map[t.detach().to("cpu", torch.int64)].to(t.device)


def q_sample(s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (METHOD.md §3; DDPM Eq. 4)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    return _extract(s.sqrt_alphas_cumprod, t, x0) * x0 + _extract(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(
    s: Schedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True posterior q(x_{t-1} | x_t, x_0): (mean, variance, clipped log-variance) (DDPM Eq. 6-7)."""
    if x0.shape != xt.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} differs from x_t shape {tuple(xt.shape)}")
    mean = _extract(s.posterior_mean_coef1, t, xt) * x0 + _extract(s.posterior_mean_coef2, t, xt) * xt
    var = _extract(s.posterior_variance, t, xt).expand_as(xt)
    log_var = _extract(s.posterior_log_variance_clipped, t, xt).expand_as(xt)
    return mean, var, log_var


def predict_x0_from_eps(s: Schedule, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, written with the stable coefficients."""
    return _extract(s.sqrt_recip_alphas_cumprod, t, xt) * xt - _extract(s.sqrt_recipm1_alphas_cumprod, t, xt) * eps


def _split_output(model_out: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    c = xt.shape[1]
    if model_out.shape[0] != xt.shape[0] or model_out.shape[2:] != xt.shape[2:]:
        raise ValueError(f"model output shape {tuple(model_out.shape)} does not match x_t {tuple(xt.shape)}")
    if model_out.shape[1] == 2 * c:
        eps, v = torch.split(model_out, c, dim=1)
        return eps, v
    if model_out.shape[1] == c:
        return model_out, None
    raise ValueError(f"model output has {model_out.shape[1]} channels; expected {c} or {2 * c}")


def p_mean_variance(
    s: Schedule, model_out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip: bool = True
) -> dict[str, torch.Tensor]:
    """The model's p_theta(x_{t-1} | x_t) (METHOD.md §2).

    Variance: learned range, ``log var = v log beta_t + (1 - v) log beta~_t`` with
    ``v = (out + 1) / 2`` (improved DDPM Eq. 15; beta~ with the clipped log at t = 0). Without
    variance channels, the fixed "large" variance beta_t (beta~_1 at t = 0) is used.
    Mean: the posterior mean of the x0 predicted from eps, clipped to [-1, 1] when ``clip``.
    Returns dict(mean, var, log_var, pred_x0, eps), all in ``xt``'s dtype.
    """
    model_out = model_out.to(xt.dtype)
    eps, v = _split_output(model_out, xt)
    if v is not None:
        min_log = _extract(s.posterior_log_variance_clipped, t, xt)
        max_log = _extract(s.log_betas, t, xt)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
    else:
        fixed = torch.cat([s.posterior_variance[1:2], s.betas[1:]]) if s.num_timesteps > 1 else s.betas
        log_var = _extract(torch.log(fixed), t, xt).expand_as(xt)
    pred_x0 = predict_x0_from_eps(s, xt, t, eps)
    if clip:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    mean, _, _ = q_posterior(s, pred_x0, xt, t)
    return {"mean": mean, "var": torch.exp(log_var), "log_var": log_var, "pred_x0": pred_x0, "eps": eps}


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of 8-bit data ``x`` in [-1, 1] under a discretized Gaussian.

    Each pixel value owns a bin of width 2/255 centred on it; the two extreme bins extend to
    -inf / +inf (DDPM Eq. 13, the decoder L_0). Uses the exact normal CDF.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def kl_map_bits(
    s: Schedule, model_out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip: bool = True
) -> torch.Tensor:
    """Per pixel and channel ``KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t))`` in bits, (B, C, H, W).

    The KL-map of METHOD.md §3 (Eq. 11's first term, before normalisation); the model mean comes
    from the clipped x0 prediction when ``clip`` (the default, as in scoring).
    """
    true_mean, _, true_log_var = q_posterior(s, x0, xt, t)
    out = p_mean_variance(s, model_out, xt, t, clip=clip)
    return normal_kl(true_mean, true_log_var, out["mean"], out["log_var"]) / _LN2


def vb_terms_bits(
    s: Schedule, model_out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip: bool = False
) -> torch.Tensor:
    """The variational-bound term per sample in bits, (B,): mean-over-pixels KL L_{t-1}, or at
    t = 0 the discretized-Gaussian NLL of x0 (L_0). ``clip=False`` as in improved-diffusion's
    training loss."""
    true_mean, _, true_log_var = q_posterior(s, x0, xt, t)
    out = p_mean_variance(s, model_out, xt, t, clip=clip)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_var"])) / _LN2
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_var"])) / _LN2
    return torch.where(t.to(kl.device) == 0, nll, kl)


UNetFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def training_losses(
    s: Schedule,
    unet: UNetFn,
    x0: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None,
    feature_target_features: torch.Tensor | None,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    feature_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The hybrid loss of METHOD.md §2 per sample: dict(loss, mse, vb, feature), each (B,), float32.

    - ``mse``: mean over C, H, W of ``(eps - eps_theta)^2``.
    - ``vb``: :func:`vb_terms_bits` computed with the model mean DETACHED (stop-gradient), so it
      only trains the variance channels. As improved-diffusion's rescaled hybrid loss, it is
      multiplied by ``num_timesteps / 1000``; on the paper's 1000-step training chain that factor
      is exactly 1, so this equals the plain (guided-diffusion "MSE") hybrid loss too. Zero
      when the UNet has no variance channels.
    - ``feature``: mean over channels and positions of ``(F_hat(x_t, t) - F(x_0))^2``, where
      ``feature_target_features`` is FeatureTarget(x0) (zero, and skipped, when None).
    - ``loss = mse + vb + feature_weight * feature``.

    ``unet(x_t, original_step, y) -> (model_out, features)``; it may run under autocast, its
    outputs are cast to float32 here.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x0 = x0.float()
    noise = noise.float()
    xt = q_sample(s, x0, t, noise)
    model_out, features = unet(xt, model_timesteps(s, t), y)
    model_out = model_out.float()
    eps, v = _split_output(model_out, xt)
    mse = _mean_flat((noise - eps) ** 2)
    if v is not None:
        frozen = torch.cat([eps.detach(), v], dim=1)
        vb = vb_terms_bits(s, frozen, x0, xt, t, clip=False) * (s.num_timesteps / 1000.0)
    else:
        vb = torch.zeros_like(mse)
    if feature_target_features is not None:
        target = feature_target_features.detach().float()
        if features.shape != target.shape:
            raise ValueError(
                f"UNet feature head output {tuple(features.shape)} does not match the feature target "
                f"{tuple(target.shape)}"
            )
        feature = _mean_flat((features.float() - target) ** 2)
    else:
        feature = torch.zeros_like(mse)
    return {"loss": mse + vb + feature_weight * feature, "mse": mse, "vb": vb, "feature": feature}


def reverse_step(
    s: Schedule,
    model_out: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    sample: bool = False,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> torch.Tensor:
    """One reverse step x_t -> x_{t-1} (METHOD.md §4 denoising step).

    ``sample=False`` returns the posterior mean mu_theta (the official code); ``sample=True``
    draws from N(mu_theta, sigma_theta^2) (the paper), with no noise where t = 0.
    """
    out = p_mean_variance(s, model_out, xt, t, clip=clip)
    if not sample:
        return out["mean"]
    noise = torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
    nonzero = (t != 0).to(device=xt.device, dtype=xt.dtype).reshape(-1, *([1] * (xt.ndim - 1)))
    return out["mean"] + nonzero * torch.exp(0.5 * out["log_var"]) * noise
