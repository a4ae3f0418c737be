"""Noise schedules and respacing (METHOD.md §2 and §3).

A :class:`Schedule` is a frozen dataclass of float64 tensors (on the CPU); the functions in
:mod:`diffad_core.diffusion.gaussian` convert the entries they need to the input's dtype and
device on use, so a schedule holds no hidden state and can be shared freely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Schedule:
    """Every per-step coefficient of a DDPM chain, float64, shape (T,).

    ``timestep_map[i]`` is the ORIGINAL (1000-step) timestep of index ``i`` of this chain; the
    UNet is always fed the original step (METHOD.md §3, ours). For an un-respaced schedule it is
    ``arange(T)``.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    log_betas: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    timestep_map: torch.Tensor  # int64

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def schedule_from_betas(betas: torch.Tensor, timestep_map: torch.Tensor | None = None) -> Schedule:
    """Derive all coefficients of a chain from its betas (DDPM, Ho et al. 2020, Eqs. 4, 6, 7)."""
    betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
    if betas.ndim != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
    if not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError("betas must lie in (0, 1]")
    n = betas.shape[0]
    if timestep_map is None:
        timestep_map = torch.arange(n, dtype=torch.int64)
    timestep_map = torch.as_tensor(timestep_map, dtype=torch.int64).cpu().clone()
    if timestep_map.shape != (n,):
        raise ValueError(f"timestep_map has shape {tuple(timestep_map.shape)}, expected ({n},)")
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    # Posterior q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7):
    #   beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    #   mu~_t   = coef1 * x_0 + coef2 * x_t
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # beta~_0 = 0: as improved-diffusion, the log is clipped by repeating beta~_1 at t = 0.
    if n > 1:
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    else:
        post_log_var = torch.log(betas.clone())
    return Schedule(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=torch.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / ac - 1.0),
        log_betas=torch.log(betas),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * torch.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac),
        timestep_map=timestep_map,
    )


def linear_schedule(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """The linear beta schedule of METHOD.md §2 (1e-4 .. 0.02 over 1000 steps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return schedule_from_betas(torch.linspace(beta_start, beta_end, steps, dtype=torch.float64))


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """The original steps kept by improved-diffusion's section-based spacing, sorted.

    ``spec`` is a comma-separated list of counts: the chain is cut into that many equal sections
    (the first ``num_timesteps % n`` sections one step longer) and section ``k`` keeps
    ``counts[k]`` evenly strided steps, rounded. For a single section "250" of 1000 steps the
    kept steps are ``round(i * 999 / 249)``. ``"ddimN"`` keeps ``range(0, T, stride)`` with the
    integer stride that yields exactly N steps.
    """
    spec = spec.strip()
    if spec.startswith("ddim"):
        wanted = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {wanted} steps with an integer stride from {num_timesteps}")
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"respacing spec {spec!r} must be comma-separated integers or 'ddimN'") from None
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing spec {spec!r} needs positive counts")
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: list[int] = []
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps (spec {spec!r})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index exactly as improved-diffusion does (same rounding).
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def respace(schedule: Schedule, spec: str = "250") -> Schedule:
    """A shorter chain over the kept steps of ``space_timesteps`` (METHOD.md §3).

    Respaced betas are ``1 - abar_{t_i} / abar_{t_{i-1}}`` (with ``abar_{t_{-1}} = 1``) so the
    cumulative products at the kept steps are unchanged. ``timestep_map`` maps a respaced index
    to the original step, composed with the input schedule's own map.
    """
    kept = space_timesteps(schedule.num_timesteps, spec)
    ac = schedule.alphas_cumprod
    new_betas = []
    last = torch.tensor(1.0, dtype=torch.float64)
    for i in kept:
        new_betas.append(1.0 - ac[i] / last)
        last = ac[i]
    tmap = schedule.timestep_map[torch.tensor(kept, dtype=torch.int64)]
    return schedule_from_betas(torch.stack(new_betas), tmap)


def diffusion_schedules(steps: int, beta_start: float, beta_end: float, respacing: str) -> tuple[Schedule, Schedule]:
    """(training schedule over all steps, respaced sampling/scoring schedule)."""
    base = linear_schedule(steps, beta_start, beta_end)
    return base, respace(base, respacing)

