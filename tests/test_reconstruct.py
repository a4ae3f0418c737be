"""Gradient denoising reconstruction (METHOD.md §4, Algorithm 1)."""

from __future__ import annotations

import types

import pytest
import torch

from diffad_core.config import load_config
from diffad_core.diffusion import diffusion_schedules
from diffad_core.reconstruct import gradient_denoise

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


class _Model(types.SimpleNamespace):
    """The fields of model.DiffadModel that reconstruction reads."""

    def class_labels(self, category: str, n: int) -> torch.Tensor | None:
        return None


def _normal_images(n: int, seed: int) -> torch.Tensor:
    """Striped texture with a little noise: the 'normal' product."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.arange(SIZE, dtype=torch.float32)
    stripes = 0.4 * torch.sin(xs / 2.0).view(1, 1, 1, SIZE).expand(n, 3, SIZE, SIZE)
    return (stripes - 0.2 + 0.03 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def model() -> types.SimpleNamespace:
    from diffad_core.nets import Padim, UNet

    cfg = load_config("smoke", overrides=["reconstruct.rounds=4", "reconstruct.grad_steps=5"])
    torch.manual_seed(0)
    padim = Padim(cfg.padim, SIZE)
    padim.fit([_normal_images(6, seed=s) for s in range(3)])
    # Untrained UNet: the ADM output conv is zero, so eps = 0 and the reverse step is a near
    # identity; the test isolates the PaDiM-gradient part of Algorithm 1.
    unet = UNet(cfg.unet, SIZE, feature_channels=8).eval()
    _, respaced = diffusion_schedules(cfg.diffusion.steps, cfg.diffusion.beta_start,
                                      cfg.diffusion.beta_end, cfg.diffusion.respacing)
    return _Model(cfg=cfg, unet=unet, feature_target=None, padim=padim,
                                 schedule=respaced, class_index={"weave": 0},
                                 device=torch.device("cpu"), meta={"categories": ["weave"]})


def _defective() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    clean = _normal_images(2, seed=99)
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    mask[0, 8:16, 10:18] = True
    mask[1, 18:26, 6:14] = True
    x = torch.where(mask[:, None], torch.tensor(0.9), clean)
    return x, mask, clean


def test_gradient_denoise_removes_the_defect_and_keeps_the_rest(model: types.SimpleNamespace) -> None:
    x, mask, clean = _defective()
    out = gradient_denoise(model, x, model.cfg.reconstruct, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    with torch.no_grad():
        before = model.padim.score_map(x).mean(dim=(1, 2))
        after = model.padim.score_map(out).mean(dim=(1, 2))
    assert (after < before).all(), (before, after)
    change = (out - x).abs().mean(dim=1)
    inside = torch.stack([change[i][mask[i]].mean() for i in range(2)])
    outside = torch.stack([change[i][~mask[i]].mean() for i in range(2)])
    # Inside the defect the image moves towards the clean one ...
    err_before = torch.stack([(x - clean).abs().mean(1)[i][mask[i]].mean() for i in range(2)])
    err_after = torch.stack([(out - clean).abs().mean(1)[i][mask[i]].mean() for i in range(2)])
    assert (err_after < err_before).all(), (err_before, err_after)
    # ... and changes there clearly more than in the normal regions.
    assert (inside > 1.5 * outside).all(), (inside, outside)


def test_gradient_denoise_is_deterministic_and_batched(model: types.SimpleNamespace) -> None:
    x, _, _ = _defective()
    cfg = model.cfg.reconstruct.model_copy(update={"rounds": 1, "sample": True})
    a = gradient_denoise(model, x, cfg, torch.Generator().manual_seed(5))
    b = gradient_denoise(model, x, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # per-image results do not depend on the batch (noise aside: use the posterior mean)
    cfg_mean = cfg.model_copy(update={"sample": False})
    both = gradient_denoise(model, x, cfg_mean)
    one = gradient_denoise(model, x[1:], cfg_mean)
    assert torch.allclose(both[1:], one, atol=1e-5)


def _plain_algorithm_1(m: types.SimpleNamespace, images: torch.Tensor, cfg) -> torch.Tensor:
    """Algorithm 1 written out plainly (METHOD.md §4): the whole batch in each call, autograd
    through the PaDiM map for g, the posterior mean as the reverse step."""
    import math

    from diffad_core.diffusion import model_timesteps, p_mean_variance

    s = cfg.step_size
    t = torch.full((images.shape[0],), cfg.denoise_t)
    x = images.clone()
    for _ in range(cfg.rounds):
        for _ in range(cfg.grad_steps):
            xg = x.detach().requires_grad_(True)
            m.padim.score_map(xg).flatten(1).mean(dim=1).sum().backward()
            g = -xg.grad
            g = g / g.flatten(1).std(dim=1).view(-1, 1, 1, 1)
            x = math.sqrt(1 - s * s) * x + s * g
        with torch.no_grad():
            out, _ = m.unet(x, model_timesteps(m.schedule, t), None)
            x = p_mean_variance(m.schedule, out, x, t, clip=True)["mean"]
    return x.clamp(-1, 1)


def test_gradient_denoise_equals_the_plain_algorithm(model: types.SimpleNamespace, monkeypatch) -> None:
    """The lean Algorithm 1 (closed-form PaDiM gradient, the UNet a few images at a time with
    channels-last weights; issue #11) gives the plain computation's images to float tolerance."""
    import copy

    import diffad_core.runtime as runtime

    m = copy.copy(model)
    m.unet = copy.deepcopy(model.unet)
    with torch.no_grad():  # a non-trivial reverse step: eps and v not zero
        for p in m.unet.out.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    x, _, _ = _defective()
    x = torch.cat([x, _normal_images(1, seed=7)])
    monkeypatch.setattr(runtime, "_CPU_PIXELS_PER_CALL", 2 * SIZE * SIZE)  # calls of 2, 2 and 1 image
    # Several rounds (each with its reverse step), and several gradient steps in one round. Not
    # both at once: on this random network the sixth step of 2 x 3 crosses a kink for one image
    # at one thread (its difference jumps from 2e-6 to 6e-2 in that step, while the others stay
    # at 2e-6), so it would compare where the two computations round to other branches.
    for rounds, grad_steps in ((2, 1), (1, 3)):
        cfg = model.cfg.reconstruct.model_copy(update={"rounds": rounds, "grad_steps": grad_steps,
                                                       "sample": False})
        expected = _plain_algorithm_1(m, x, cfg)
        got = gradient_denoise(m, x, cfg)
        assert torch.allclose(got, expected, atol=1e-5), (rounds, grad_steps, (got - expected).abs().max())
    # Channels-last convolutions round differently, and Algorithm 1 amplifies rounding over
    # rounds (g is rescaled to unit std each step): one round and one step are compared there.
    one = cfg.model_copy(update={"rounds": 1, "grad_steps": 1})
    expected_one = _plain_algorithm_1(m, x, one)
    runtime.prepare_for_inference(m, channels_last="on")
    got = gradient_denoise(m, x, one)
    assert torch.allclose(got, expected_one, atol=1e-5), (got - expected_one).abs().max()


def test_gradient_denoise_rejects_bad_settings(model: types.SimpleNamespace) -> None:
    x, _, _ = _defective()
    with pytest.raises(ValueError, match="denoise_t"):
        gradient_denoise(model, x, model.cfg.reconstruct.model_copy(update={"denoise_t": 250}))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        gradient_denoise(model, x[:, :1], model.cfg.reconstruct)


def test_reconstruction_order_covers_every_defect_type_first():
    from diffad_core.reconstruct import reconstruction_order

    kinds = ["bend", "bend", "bend", "good", "hole", "hole", "stain"]
    labels = [1, 1, 1, 0, 1, 1, 1]
    order = reconstruction_order(labels, kinds)
    assert [kinds[i] for i in order[:3]] == ["bend", "hole", "stain"]
    assert order[:5] == [0, 4, 6, 1, 5] and order[-1] == 3


def test_reconstruct_split_follows_the_order_and_limit(monkeypatch):
    from types import SimpleNamespace

    import numpy as np

    import diffad_core.reconstruct as rec

    calls = []

    def fake_denoise(model, batch, cfg, generator, category=None):
        calls.append((batch.shape[0], category))
        return batch * 0.5

    monkeypatch.setattr(rec, "gradient_denoise", fake_denoise)
    cfg = load_config("smoke", overrides=["reconstruct.batch_size=2"])
    images = np.arange(5 * 3 * 2 * 2, dtype=np.float32).reshape(5, 3, 2, 2)
    prepared = SimpleNamespace(images=images, labels=np.array([0, 1, 1, 0, 1]),
                               defect_types=["good", "hole", "hole", "good", "stain"],
                               category="weave")
    out = list(rec.reconstruct_split(SimpleNamespace(cfg=cfg), prepared, cfg.reconstruct, limit=3))
    assert [i for i, _ in out] == [1, 4, 2]
    assert calls == [(2, "weave"), (1, "weave")]
    assert torch.equal(out[0][1], torch.from_numpy(images[1]) * 0.5)
