import numpy as np
import pytest
import torch

from diffad_core.config import PadimConfig, WeightsConfig, load_config
from diffad_core.nets import Padim

SIZE = 32


def _cfg(**update) -> PadimConfig:
    return load_config("smoke").padim.model_copy(update=update)  # random Lite0, 32 channels


def _normal_images(n: int, seed: int) -> torch.Tensor:
    """A fixed smooth pattern plus a little noise: the 'normal' class."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    base = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy]) * 0.5
    return (base[None] + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=gen)).clamp(-1, 1)


@pytest.fixture(scope="module")
def fitted() -> Padim:
    torch.manual_seed(0)
    model = Padim(_cfg(), SIZE)
    images = _normal_images(12, seed=1)
    return model.fit([images[:5], (images[5:9], torch.zeros(4)), images[9:]])


def test_shapes_and_channel_selection(fitted):
    assert fitted.grid == (8, 8) and fitted.n_channels == 32
    assert fitted.mean.shape == (64, 32) and fitted.inv_cov.shape == (64, 32, 32)
    assert int(fitted.n_fit) == 12
    expected = torch.randperm(24 + 40 + 112, generator=torch.Generator().manual_seed(0))[:32]
    assert torch.equal(fitted.channel_index, expected.sort().values)
    assert fitted.score_map(_normal_images(3, seed=2)).shape == (3, 8, 8)


def test_mahalanobis_matches_numpy(fitted):
    train = _normal_images(12, seed=1)
    test = _normal_images(1, seed=9)
    with torch.no_grad():
        emb = fitted.embed(train).double().numpy()  # (N, d, P)
        e_test = fitted.embed(test).double().numpy()[0]
        score = fitted.score_map(test)[0].double().numpy()
    p = 27  # grid position (3, 3)
    feats = emb[:, :, p]
    mu = feats.mean(axis=0)
    cov = np.cov(feats, rowvar=False) + 0.01 * np.eye(feats.shape[1])
    diff = e_test[:, p] - mu
    expected = np.sqrt(diff @ np.linalg.inv(cov) @ diff)
    assert score.reshape(-1)[p] == pytest.approx(expected, rel=1e-3)


def test_streaming_fit_equals_single_batch(fitted, monkeypatch):
    import diffad_core.nets.padim as padim_module

    monkeypatch.setattr(padim_module, "_INV_CHUNK", 5)  # invert in uneven chunks of positions
    torch.manual_seed(0)
    once = Padim(_cfg(), SIZE).fit([_normal_images(12, seed=1)])
    assert torch.allclose(once.mean, fitted.mean, atol=1e-5)
    assert torch.allclose(once.inv_cov, fitted.inv_cov, rtol=1e-3, atol=1e-3)


def test_gradients_flow_to_the_input(fitted):
    x = _normal_images(2, seed=3).requires_grad_(True)
    fitted.score_map(x).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in fitted.parameters())


def test_perturbed_images_score_higher(fitted):
    normal = _normal_images(4, seed=4)
    defect = normal.clone()
    defect[:, :, 8:20, 10:22] = torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        s_normal = fitted.score_map(normal)
        s_defect = fitted.score_map(defect)
    assert s_defect.mean() > 2 * s_normal.mean()
    assert s_defect[:, 2:5, 2:5].mean() > s_normal[:, 2:5, 2:5].mean()


def test_state_dict_round_trip(fitted, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "padim.safetensors"
    save_file({k: v.contiguous() for k, v in fitted.state_dict().items()}, str(path))
    torch.manual_seed(123)  # a different random backbone, replaced by the saved weights
    restored = Padim(_cfg(), SIZE)
    assert not restored.fitted
    restored.load_state_dict(load_file(str(path)))
    for name in ("channel_index", "mean", "inv_cov", "n_fit"):
        assert torch.equal(getattr(restored, name), getattr(fitted, name)), name
    x = _normal_images(2, seed=5)
    with torch.no_grad():
        assert torch.equal(restored.score_map(x), fitted.score_map(x))


def test_errors():
    model = Padim(_cfg(), SIZE)
    with pytest.raises(RuntimeError, match="before fit"):
        model.score_map(_normal_images(1, seed=0))
    with pytest.raises(ValueError, match="at least 2 images"):
        model.fit([_normal_images(1, seed=0)])
    with pytest.raises(ValueError, match="built for 32x32"):
        model.embed(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="n_channels=1000"):
        Padim(_cfg(n_channels=1000), SIZE)
    other = Padim(_cfg(), 64)
    other.fit([torch.zeros(2, 3, 64, 64), torch.ones(1, 3, 64, 64) * 0.1])
    with pytest.raises(ValueError, match="mean has shape"):
        model.load_state_dict(other.state_dict())


def test_wide_resnet_layers_1_to_3_channels():
    cfg = PadimConfig(weights=WeightsConfig(timm_name="wide_resnet50_2", pretrained=False),
                      n_channels=500)
    model = Padim(cfg, 32)
    assert model.backbone.feature_info.channels() == [256, 512, 1024]
    assert model.grid == (8, 8) and model.n_channels == 500


def test_embedding_selects_channels_before_resizing_as_if_after(fitted):
    """embed() keeps the chosen channels of each layer before resizing (issue #11); resizing all
    channels and then selecting gives the same embedding (to float32 rounding)."""
    from diffad_core.nets.features import resize_concat

    x = _normal_images(2, seed=6)
    with torch.no_grad():
        inp = ((x + 1) / 2 - fitted.norm_mean) / fitted.norm_std
        full = resize_concat(list(fitted.backbone(inp)), fitted.grid)
        expected = full.index_select(1, fitted.channel_index).flatten(2)
        assert torch.allclose(fitted.embed(x), expected, rtol=1e-6, atol=1e-6)


def test_mean_score_gradient_equals_autograd_of_the_mean_score(fitted):
    """The closed-form Mahalanobis gradient (issue #11) is autograd's gradient of each image's
    mean score_map, to float32 tolerance."""
    x = _normal_images(3, seed=8)
    x[1, :, 2:6, 2:6] = 0.9  # one image with a defect: larger, uneven gradients
    xg = x.clone().requires_grad_(True)
    fitted.score_map(xg).flatten(1).mean(dim=1).sum().backward()
    grad = fitted.mean_score_gradient(x)
    assert grad.shape == x.shape
    assert torch.allclose(grad, xg.grad, rtol=1e-4, atol=1e-6 * float(xg.grad.abs().max()))
    assert all(p.grad is None for p in fitted.parameters())
