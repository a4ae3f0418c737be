import math

import pytest
import torch

from diffad_core.diffusion import linear_schedule, respace, schedule_from_betas, space_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_betas_endpoints_and_dtype():
    s = linear_schedule(1000, 1e-4, 0.02)
    assert s.betas.dtype == torch.float64 and s.num_timesteps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert s.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert s.betas[1].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 999, rel=1e-12)
    assert torch.equal(s.timestep_map, torch.arange(1000))


def test_respacing_250_keeps_rounded_steps_and_maps_scoring_timesteps():
    base = linear_schedule()
    r = respace(base, "250")
    assert r.num_timesteps == 250
    assert r.timestep_map.tolist() == [round(i * 999 / 249) for i in range(250)]
    # METHOD.md §3: T = {5, 50, 100} are original steps {20, 201, 401}.
    assert r.timestep_map[torch.tensor([5, 50, 100])].tolist() == [20, 201, 401]


def test_respaced_betas_match_hand_computation():
    base = linear_schedule()
    r = respace(base, "250")
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert r.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    for i in (1, 5, 50, 100, 249):
        t_i, t_prev = int(r.timestep_map[i]), int(r.timestep_map[i - 1])
        expected = 1 - abar[t_i].item() / abar[t_prev].item()
        assert r.betas[i].item() == pytest.approx(expected, rel=1e-12)
    # The cumulative products are preserved at the kept steps.
    assert torch.allclose(r.alphas_cumprod, base.alphas_cumprod[r.timestep_map], rtol=1e-12, atol=0)


def test_space_timesteps_sections():
    # Sections of 34, 33, 33 steps: 3 / 1 / 4 kept per section (improved-diffusion semantics).
    assert space_timesteps(100, "3,1,4") == [0, 16, 33, 34, 67, 78, 88, 99]
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="comma-separated"):
        space_timesteps(10, "a,b")


def test_respace_composes_timestep_maps():
    twice = respace(respace(linear_schedule(), "250"), "10")
    assert twice.timestep_map.tolist()[:2] == [0, round(round(249 / 9) * 999 / 249)]


def test_posterior_coefficients_vs_hand_computation():
    s = linear_schedule()
    betas = [1e-4 + (0.02 - 1e-4) * k / 999 for k in range(1000)]
    abar = 1.0
    abars = []
    for b in betas:
        abar *= 1 - b
        abars.append(abar)
    for t in (1, 10, 500, 999):
        b, a, ap = betas[t], abars[t], abars[t - 1]
        var = b * (1 - ap) / (1 - a)
        assert s.posterior_variance[t].item() == pytest.approx(var, rel=1e-10)
        assert s.posterior_log_variance_clipped[t].item() == pytest.approx(math.log(var), rel=1e-10)
        assert s.posterior_mean_coef1[t].item() == pytest.approx(b * math.sqrt(ap) / (1 - a), rel=1e-10)
        assert s.posterior_mean_coef2[t].item() == pytest.approx((1 - ap) * math.sqrt(1 - b) / (1 - a), rel=1e-10)
    # t = 0: beta~_0 = 0 and its log is clipped to log beta~_1 (improved-diffusion).
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(s.posterior_log_variance_clipped[1].item())
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0)
    assert s.posterior_mean_coef2[0].item() == pytest.approx(0.0)


def test_schedule_rejects_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        schedule_from_betas(torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match="beta_start"):
        linear_schedule(10, 0.5, 0.1)
