import math

import pytest
import torch

from diffad_core.diffusion import (
    discretized_gaussian_log_likelihood,
    kl_map_bits,
    linear_schedule,
    normal_kl,
    p_mean_variance,
    q_posterior,
    q_sample,
    respace,
    reverse_step,
    training_losses,
    vb_terms_bits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sched():
    return linear_schedule()


def test_q_sample_matches_closed_form(sched):
    x0 = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    noise = torch.ones_like(x0)
    t = torch.tensor([0, 999])
    xt = q_sample(sched, x0, t, noise)
    for b, step in enumerate((0, 999)):
        abar = torch.cumprod(1 - sched.betas, 0)[step].item()
        expected = math.sqrt(abar) * x0[b] + math.sqrt(1 - abar)
        assert torch.allclose(xt[b], expected, atol=1e-6)
    assert xt.dtype == torch.float32


def test_posterior_of_q_sample_is_consistent(sched):
    # The posterior mean lies between x0 and x_t: mean = c1 x0 + c2 x_t, with c1 + c2 sqrt(abar_t)/sqrt(abar_{t-1}) = 1.
    t = torch.tensor([10, 500])
    x0 = torch.full((2, 1, 2, 2), 0.3, dtype=torch.float64)
    xt = q_sample(sched, x0, t, torch.zeros_like(x0))  # noiseless: x_t = sqrt(abar_t) x0
    mean, var, log_var = q_posterior(sched, x0, xt, t)
    abar_prev = sched.alphas_cumprod_prev[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(mean, abar_prev.sqrt() * x0, atol=1e-12)
    assert torch.allclose(var.log(), log_var, atol=1e-12)


def test_normal_kl_identical_is_zero_and_matches_torch():
    m = torch.tensor([0.0, 1.5, -2.0])
    lv = torch.tensor([0.0, -1.0, 2.0])
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(3), atol=1e-7)
    m2 = torch.tensor([0.5, -0.5, 1.0])
    lv2 = torch.tensor([1.0, 0.3, -0.7])
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, (0.5 * lv).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert torch.allclose(normal_kl(m, lv, m2, lv2), ref, atol=1e-6)


def test_discretized_nll_sane():
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    means = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    # Very narrow Gaussian centred on the pixel: nearly all mass in its bin -> log p ~ 0.
    ll = discretized_gaussian_log_likelihood(x, means, torch.full_like(x, math.log(1e-4)))
    assert torch.all(ll <= 0) and torch.all(ll > -1e-6)
    # Centred, sigma = 1: interior bin mass ~ width * density = (2/255) * 0.3989.
    ll1 = discretized_gaussian_log_likelihood(torch.zeros(1), torch.zeros(1), torch.zeros(1))
    assert ll1.item() == pytest.approx(math.log(2 / 255 * 0.398942), rel=1e-3)
    # Edge bins extend to infinity: x = 1 with the mean far above is almost certain.
    ll_edge = discretized_gaussian_log_likelihood(torch.ones(1), torch.full((1,), 5.0), torch.zeros(1))
    assert ll_edge.item() > -1e-3
    # Far off -> very unlikely, but finite (clamped).
    far = discretized_gaussian_log_likelihood(torch.zeros(1), torch.full((1,), 0.9), torch.full((1,), math.log(1e-3)))
    assert torch.isfinite(far).all() and far.item() < -20


def test_learned_range_variance_endpoints(sched):
    t = torch.tensor([0, 3, 400])
    xt = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.zeros_like(xt)
    for v_out, expected in ((-1.0, sched.posterior_log_variance_clipped), (1.0, sched.log_betas)):
        out = p_mean_variance(sched, torch.cat([eps, torch.full_like(xt, v_out)], 1), xt, t)
        assert torch.allclose(out["log_var"], expected[t].float().reshape(-1, 1, 1, 1).expand_as(xt), atol=1e-6)
        assert torch.allclose(out["var"], out["log_var"].exp())
    # v = 0 -> the geometric midpoint.
    out = p_mean_variance(sched, torch.cat([eps, torch.zeros_like(xt)], 1), xt, t)
    mid = 0.5 * (sched.log_betas[t] + sched.posterior_log_variance_clipped[t])
    assert torch.allclose(out["log_var"][:, 0, 0, 0], mid.float(), atol=1e-6)


def test_p_mean_variance_with_true_eps_recovers_posterior(sched):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([7, 300])
    xt = q_sample(sched, x0, t, noise)
    out = p_mean_variance(sched, torch.cat([noise, torch.zeros_like(noise)], 1), xt, t, clip=True)
    true_mean, _, _ = q_posterior(sched, x0, xt, t)
    assert torch.allclose(out["pred_x0"], x0, atol=1e-9)
    assert torch.allclose(out["mean"], true_mean, atol=1e-9)
    # Clipping: a huge eps drives the x0 prediction out of range; clip keeps it in [-1, 1].
    wild = p_mean_variance(sched, torch.cat([noise * 50, noise], 1), xt, t, clip=True)
    assert wild["pred_x0"].abs().max() <= 1.0
    # KL map of the perfect mean and posterior variance (v = -1) is zero.
    kl = kl_map_bits(sched, torch.cat([noise, -torch.ones_like(noise)], 1), x0, xt, t)
    assert kl.shape == x0.shape and kl.abs().max() < 1e-9


def test_kl_map_bits_is_nats_over_ln2(sched):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    xt = q_sample(sched, x0, torch.tensor([50]), torch.randn(x0.shape, generator=g))
    out = torch.randn(1, 6, 4, 4, generator=g) * 0.3
    t = torch.tensor([50])
    mean, _, lv = q_posterior(sched, x0, xt, t)
    p = p_mean_variance(sched, out, xt, t, clip=True)
    ref = normal_kl(mean, lv, p["mean"], p["log_var"]) / math.log(2)
    assert torch.allclose(kl_map_bits(sched, out, x0, xt, t), ref)
    assert (kl_map_bits(sched, out, x0, xt, t) >= -1e-6).all()
    # vb_terms_bits averages the unclipped map; at t = 0 it is the decoder NLL instead.
    vb = vb_terms_bits(sched, out, x0, xt, t, clip=False)
    assert vb.shape == (1,)
    assert vb.item() == pytest.approx(kl_map_bits(sched, out, x0, xt, t, clip=False).mean().item(), rel=1e-5)
    t0 = torch.tensor([0])
    p0 = p_mean_variance(sched, out, xt, t0, clip=False)
    nll = -discretized_gaussian_log_likelihood(x0, p0["mean"], 0.5 * p0["log_var"]).mean() / math.log(2)
    assert vb_terms_bits(sched, out, x0, xt, t0).item() == pytest.approx(nll.item(), rel=1e-5)


def test_reverse_step_mean_and_sample(sched):
    r = respace(sched, "250")
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(2, 3, 4, 4, generator=g)
    out = torch.randn(2, 6, 4, 4, generator=g) * 0.1
    t = torch.tensor([8, 0])
    mean = reverse_step(r, out, xt, t, sample=False)
    assert torch.allclose(mean, p_mean_variance(r, out, xt, t)["mean"])
    sampled = reverse_step(r, out, xt, t, sample=True, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(sampled[0], mean[0])
    assert torch.equal(sampled[1], mean[1])  # no noise at t = 0
    again = reverse_step(r, out, xt, t, sample=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sampled, again)


class _TinyNet(torch.nn.Module):
    """A 1x1-conv stand-in for the UNet: (eps, v) and a 1/4-resolution feature head."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Conv2d(3, 6, 1)
        self.feat = torch.nn.Conv2d(3, 5, 1)
        self.seen_t: torch.Tensor | None = None

    def forward(self, x, t, y=None):
        self.seen_t = t
        return self.out(x), self.feat(torch.nn.functional.avg_pool2d(x, 4))


def test_training_losses_stop_gradient_and_timestep_map(sched):
    torch.manual_seed(0)
    net = _TinyNet()
    r = respace(sched, "250")
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    target = torch.randn(2, 5, 2, 2)
    t = torch.tensor([5, 100])
    losses = training_losses(r, net, x0, t, None, target, generator=torch.Generator().manual_seed(0))
    assert net.seen_t.tolist() == [20, 401]  # the UNet is fed the original steps
    assert set(losses) == {"loss", "mse", "vb", "feature"}
    for v in losses.values():
        assert v.shape == (2,) and torch.isfinite(v).all()
    assert torch.allclose(losses["loss"], losses["mse"] + losses["vb"] + losses["feature"])
    # vb is the bound term scaled by num_timesteps / 1000 (improved-diffusion's rescaled hybrid loss).
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xt = q_sample(r, x0, t, noise)
    with torch.no_grad():
        raw = vb_terms_bits(r, net(xt, torch.tensor([20, 401]))[0], x0, xt, t)
    assert torch.allclose(losses["vb"].detach(), raw * 0.25, rtol=1e-5)
    # The vb term must not push gradient into the eps channels (stop-gradient on the mean).
    net.zero_grad()
    losses["vb"].sum().backward()
    grad = net.out.weight.grad
    assert grad[:3].abs().max() == 0 and grad[3:].abs().max() > 0
    assert net.feat.weight.grad is None or net.feat.weight.grad.abs().max() == 0


def test_training_losses_with_given_noise_is_deterministic(sched):
    torch.manual_seed(0)
    net = _TinyNet()
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    noise = torch.randn(2, 3, 8, 8)
    t = torch.tensor([0, 999])
    a = training_losses(sched, net, x0, t, None, None, noise=noise)
    b = training_losses(sched, net, x0, t, None, None, noise=noise)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["feature"], torch.zeros(2))
    eps = net(q_sample(sched, x0, t, noise), t)[0][:, :3]
    assert torch.allclose(a["mse"], ((eps - noise) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="feature target"):
        training_losses(sched, net, x0, t, None, torch.zeros(2, 5, 4, 4), noise=noise)
