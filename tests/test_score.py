"""Anomaly scoring (METHOD.md §3, Eq. 11): shapes, determinism, the official computation of
the ``paper`` settings against an independent reference, the variants and calibration."""

from __future__ import annotations

import json
import math
import types
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffad_core.config import load_config
from diffad_core.data import PreparedSplit
from diffad_core.diffusion import diffusion_schedules
from diffad_core.score import (
    ComponentMaps,
    MapCalibration,
    PositionMaps,
    ScoreRecord,
    _normalise_per_image,
    anomaly_map,
    component_maps,
    default_top_k,
    feature_term,
    fit_feature_whitening,
    image_scores,
    kl_term,
    score_batch,
    score_split,
    top_k_mean,
)

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


class _Model(types.SimpleNamespace):
    """The fields of model.DiffadModel that scoring reads."""

    def class_labels(self, category: str, n: int) -> torch.Tensor | None:
        return None


def _smoke_model(seed: int = 0, preset: str = "smoke", **overrides: object) -> _Model:
    """A deterministic, untrained smoke-size model (``preset`` settings, ``overrides`` as
    dotted keys with their section)."""
    from diffad_core.nets import FeatureTarget, UNet

    cfg = load_config(preset, overrides=[f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(seed)
    target = FeatureTarget(cfg.features).eval()
    unet = UNet(cfg.unet, cfg.data.image_size, feature_channels=target.channels).eval()
    # The ADM output conv starts at zero; give it weights so eps and v are non-trivial.
    with torch.no_grad():
        for p in unet.out.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    _, respaced = diffusion_schedules(cfg.diffusion.steps, cfg.diffusion.beta_start,
                                      cfg.diffusion.beta_end, cfg.diffusion.respacing)
    return _Model(cfg=cfg, unet=unet, feature_target=target, padim=None, schedule=respaced,
                  class_index={"weave": 0}, device=torch.device("cpu"), meta={"categories": ["weave"]})


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1


def _batch(m: _Model, x: torch.Tensor, alpha: float, seed: int, **kw: object):
    return score_batch(m, x, "weave", m.cfg.score, alpha=alpha,
                       generator=torch.Generator().manual_seed(seed), **kw)


# The paper preset's settings on a network small enough for the CPU (random weights).
_TINY_PAPER = {"data.image_size": 32, "unet.base_channels": 16, "unet.channel_mult": "[1,2,2]",
               "unet.num_res_blocks": 1, "unet.attention_resolutions": "[16]",
               "unet.num_head_channels": 16, "unet.class_cond": "false", "score.ablations": "[]",
               "features.weights.pretrained": "false",
               "features.weights.timm_name": "tf_efficientnet_lite0"}


@pytest.fixture(scope="module")
def model() -> _Model:
    return _smoke_model()


def test_default_top_k_scales_with_area() -> None:
    assert default_top_k(256) == 64
    assert default_top_k(512) == 256
    assert default_top_k(64) == 4
    assert default_top_k(16) == 1  # never below one pixel
    assert default_top_k((128, 256)) == 32


def test_top_k_mean() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, :3] = torch.tensor([3.0, 2.0, 1.0])
    maps[1, 3, 3] = 8.0
    assert torch.allclose(top_k_mean(maps, 2), torch.tensor([2.5, 4.0]))
    assert torch.allclose(top_k_mean(maps, 1000), maps.flatten(1).mean(1))


def test_image_score_against_the_images_own_background() -> None:
    # score.image_score_center (bench/tune_cpu_center_rule.md): median removes each image's own
    # level, robust its level and spread; none is the plain top-k mean.
    settings = load_config("smoke").score
    maps = 0.5 * torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    maps[:, 2:6, 2:6] += torch.arange(16.0).view(4, 4)  # a peak on a quarter of the pixels
    shifted = maps * torch.tensor([3.0, 0.5]).view(2, 1, 1) + torch.tensor([10.0, -4.0]).view(2, 1, 1)
    read = {c: settings.model_copy(update={"image_score_center": c, "top_k": 3})
            for c in ("none", "median", "robust")}
    assert torch.allclose(image_scores(maps, read["none"]), top_k_mean(maps, 3))
    median = torch.quantile(maps.flatten(1), 0.5, dim=1)
    assert torch.allclose(image_scores(maps, read["median"]), top_k_mean(maps, 3) - median)
    offset_only = maps + torch.tensor([10.0, -4.0]).view(2, 1, 1)
    assert torch.allclose(image_scores(offset_only, read["median"]), image_scores(maps, read["median"]), atol=1e-5)
    assert torch.allclose(image_scores(shifted, read["robust"]), image_scores(maps, read["robust"]), atol=1e-4)
    assert not torch.allclose(image_scores(shifted, read["median"]), image_scores(maps, read["median"]))
    flat = torch.full((1, 8, 8), 2.0)  # no spread: the IQR floor keeps it finite
    assert torch.isfinite(image_scores(flat, read["robust"])).all()


def test_kl_normalisation_is_per_image_over_chw() -> None:
    x = torch.randn(3, 3, 8, 8) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1, 1, 1) + 7.0
    for unbiased in (False, True):
        flat = _normalise_per_image(x, unbiased).flatten(1)
        assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-5)
        assert torch.allclose(flat.std(1, unbiased=unbiased), torch.ones(3), atol=1e-5)


def test_score_batch_shapes_and_determinism(model: _Model) -> None:
    x = _images()
    model.cfg.score.ablations = ["rgb"]
    a, b, c = (_batch(model, x, 0.5, seed) for seed in (3, 3, 4))
    model.cfg.score.ablations = []
    for name in ("kl", "feature"):
        assert getattr(a.components, name).shape == (2, SIZE, SIZE), name
        assert torch.equal(getattr(a.components, name), getattr(b.components, name)), name
    assert a.anomaly.shape == (2, SIZE, SIZE) and torch.equal(a.anomaly, b.anomaly)
    assert a.image_score.shape == (2,)
    assert not torch.equal(a.components.kl, c.components.kl)
    # KL maps are normalised per (image, t) before averaging: their mean stays 0.
    assert torch.allclose(a.components.kl.mean(dim=(1, 2)), torch.zeros(2), atol=1e-5)
    assert (a.components.feature >= 0).all() and (a.ablation_maps["rgb"] >= 0).all()
    assert torch.allclose(a.image_score, top_k_mean(a.anomaly, default_top_k(SIZE)))


def test_alpha_extremes_select_one_map(model: _Model) -> None:
    x = _images()
    kl_only, feat_only, half = (_batch(model, x, a, 0) for a in (1.0, 0.0, 0.5))
    assert torch.equal(kl_only.anomaly, kl_only.components.kl)
    assert torch.equal(feat_only.anomaly, feat_only.components.feature)
    assert torch.allclose(half.anomaly, 0.5 * half.components.kl + 0.5 * half.components.feature)
    with pytest.raises(ValueError, match="alpha"):
        _batch(model, x, 1.5, 0)


def test_calibration_standardises_each_term() -> None:
    maps = ComponentMaps(kl=torch.full((1, 2, 2), 3.0), feature=torch.full((1, 2, 2), 10.0))
    cal = MapCalibration(kl_mean=1.0, kl_std=2.0, feature_mean=4.0, feature_std=3.0)
    assert torch.allclose(anomaly_map(maps, 0.5, cal), torch.full((1, 2, 2), 0.5 * 1.0 + 0.5 * 2.0))
    assert torch.equal(anomaly_map(maps, 1.0), maps.kl)


def test_two_sided_reading_takes_the_calibrated_terms_absolute_value() -> None:
    # score.two_sided_terms (bench/tune_cpu_twosided_rule.md): a term far below the normals'
    # level (z = -2) scores as high as one far above it (z = +2); the other term keeps its sign.
    maps = ComponentMaps(kl=torch.tensor([[[-3.0, 5.0]]]), feature=torch.tensor([[[-2.0, 10.0]]]))
    cal = MapCalibration(kl_mean=1.0, kl_std=2.0, feature_mean=4.0, feature_std=3.0)
    z_kl, z_feature = torch.tensor([[[-2.0, 2.0]]]), torch.tensor([[[-2.0, 2.0]]])
    assert torch.allclose(anomaly_map(maps, 0.0, cal), z_feature)
    assert torch.allclose(anomaly_map(maps, 0.0, cal, ["feature"]), z_feature.abs())
    assert torch.allclose(anomaly_map(maps, 0.5, cal, ["feature"]), 0.5 * z_kl + 0.5 * z_feature.abs())
    assert torch.allclose(anomaly_map(maps, 0.5, cal, ["kl", "feature"]), torch.full((1, 1, 2), 2.0))
    with pytest.raises(ValueError, match="needs a calibration"):
        anomaly_map(maps, 0.5, None, ["feature"])


def test_scoring_reads_eq11_and_its_term_ablations_two_sided_as_configured(model: _Model) -> None:
    settings = model.cfg.score.model_copy(update={"calibrate_maps": True, "two_sided_terms": ["feature"],
                                                  "ablations": ["kl", "feature"]})
    cal = MapCalibration(kl_mean=0.0, kl_std=1.0, feature_mean=1e3, feature_std=1.0)  # every z < 0
    out = score_batch(model, _images(), "weave", settings, alpha=0.5, calibration=cal,
                      generator=torch.Generator().manual_seed(0))
    maps = out.components
    assert torch.allclose(out.anomaly, 0.5 * maps.kl + 0.5 * (1e3 - maps.feature))
    assert torch.allclose(out.ablation_maps["feature"], 1e3 - maps.feature)
    assert torch.allclose(out.ablation_maps["kl"], maps.kl)


def test_image_score_blur_option() -> None:
    amap = torch.zeros(1, 16, 16)
    amap[0, 8, 8] = 10.0
    settings = load_config("smoke", overrides=["score.top_k=1"]).score
    assert float(image_scores(amap, settings)) == 10.0
    blurred = float(image_scores(amap, settings.model_copy(update={"image_score_sigma": 2.0})))
    assert 0.0 < blurred < 10.0 * 1.0 / (2 * math.pi * 4) * 1.2


class _Spy(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, list[int], int | None]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                feature_size: int | None = None):
        self.calls.append((x.shape[0], t.tolist(), feature_size))
        return self.inner(x, t, y, feature_size=feature_size)


def test_one_batched_forward_with_mapped_timesteps() -> None:
    m = _smoke_model()
    m.unet = spy = _Spy(m.unet)
    _batch(m, _images(2), 0.5, 0)
    # respaced indices 5, 50, 100 of the 250-step chain are original steps 20, 201, 401
    assert spy.calls == [(6, [20, 20, 201, 201, 401, 401], None)]


def test_paper_settings_run_the_official_two_passes() -> None:
    m = _smoke_model(preset="paper", **_TINY_PAPER)
    m.unet = spy = _Spy(m.unet)
    _batch(m, _images(2), 0.5, 0)
    # The KL pass with the mapped steps, then the feature pass with the unmapped index, both
    # with the head on the 16x16 test grid (the official --feat_shape default).
    assert spy.calls == [(6, [20, 20, 201, 201, 401, 401], 16), (6, [5, 5, 50, 50, 100, 100], 16)]


def _reference_official(m: _Model, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``calc_bpd_loop`` + ``image_anomaly.py`` computation (batch size 1), written
    out independently of score.py and diffusion/gaussian.py: per image, per t in (5, 50, 100):
    x_t from the respaced chain; a KL pass with the mapped step (learned-range variance, x0 from
    eps clipped to [-1, 1], closed-form Gaussian KL in bits, normalised by the image's mean and
    unbiased std); a feature pass with the unmapped index on the same x_t, head and target on
    the 16x16 grid, channel-mean squared error upsampled bilinearly; means over t."""
    s = m.schedule
    f64 = lambda a, i: float(a[i])  # noqa: E731
    kl_out, feat_out = [], []
    for i in range(x.shape[0]):
        x0 = x[i:i + 1]
        kls, feats = [], []
        for j, t in enumerate((5, 50, 100)):
            eps = noise[j, i:i + 1]
            xt = math.sqrt(f64(s.alphas_cumprod, t)) * x0 + math.sqrt(1 - f64(s.alphas_cumprod, t)) * eps
            with torch.no_grad():
                out, _ = m.unet(xt, torch.tensor([int(s.timestep_map[t])]), None, feature_size=16)
                _, feat_rec = m.unet(xt, torch.tensor([t]), None, feature_size=16)
                target = m.feature_target(x0, size=16)
            eps_hat, v = out[:, :3], out[:, 3:]
            min_log = f64(s.posterior_log_variance_clipped, t)
            max_log = math.log(f64(s.betas, t))
            frac = (v + 1) / 2
            model_log_var = frac * max_log + (1 - frac) * min_log
            pred_x0 = (math.sqrt(1 / f64(s.alphas_cumprod, t)) * xt
                       - math.sqrt(1 / f64(s.alphas_cumprod, t) - 1) * eps_hat).clamp(-1, 1)
            c1, c2 = f64(s.posterior_mean_coef1, t), f64(s.posterior_mean_coef2, t)
            model_mean = c1 * pred_x0 + c2 * xt
            true_mean = c1 * x0 + c2 * xt
            true_log_var = min_log
            kl = 0.5 * (-1.0 + model_log_var - true_log_var + math.exp(true_log_var) * torch.exp(-model_log_var)
                        + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var)) / math.log(2.0)
            kls.append((kl - kl.mean()) / kl.std())
            diff = ((feat_rec - target) ** 2).mean(dim=1, keepdim=True)
            feats.append(F.interpolate(diff, size=x.shape[-2:], mode="bilinear"))
        kl_out.append((sum(kls) / 3).mean(dim=1)[0])
        feat_out.append((sum(feats) / 3)[0, 0])
    return torch.stack(kl_out), torch.stack(feat_out)


def test_paper_maps_equal_the_official_computation() -> None:
    """The ``paper`` preset's maps equal the official code's to float32 noise (issue #7)."""
    m = _smoke_model(preset="paper", **_TINY_PAPER)
    x = _images(3, seed=7)
    noise = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(5))
    maps = component_maps(m, x, "weave", m.cfg.score, noise=noise)
    kl_ref, feat_ref = _reference_official(m, x, noise)
    assert torch.allclose(maps.kl, kl_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(maps.feature, feat_ref, atol=1e-6, rtol=1e-4)
    # Eq. 11 with alpha 0.5 and the top-64-pixel mean (scaled to the image area) of it.
    amap = anomaly_map(maps, 0.5)
    assert torch.allclose(amap, 0.5 * kl_ref + 0.5 * feat_ref, atol=1e-4, rtol=1e-4)


def test_paper_maps_in_micro_batches_with_channels_last_equal_the_official(monkeypatch) -> None:
    """Issue #11's CPU path (the networks on one image at a time, channels-last weights) keeps
    the ``paper`` preset's maps equal to the official computation's."""
    import diffad_core.runtime as runtime

    m = _smoke_model(preset="paper", **_TINY_PAPER)
    x = _images(3, seed=7)
    noise = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(5))
    kl_ref, feat_ref = _reference_official(m, x, noise)
    runtime.prepare_for_inference(m, channels_last="on")
    m.unet = spy = _Spy(m.unet)
    monkeypatch.setattr(runtime, "_CPU_PIXELS_PER_CALL", SIZE * SIZE)
    maps = component_maps(m, x, "weave", m.cfg.score, noise=noise)
    assert [c[0] for c in spy.calls] == [1] * 18  # 9 rows, two passes each
    assert torch.allclose(maps.kl, kl_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(maps.feature, feat_ref, atol=1e-6, rtol=1e-4)


def test_scoring_variants_reuse_the_noise() -> None:
    m = _smoke_model(**{"score.ablations": "[grid_h4,single_pass,kl,feature]"})
    b = _batch(m, _images(2), 0.5, 0)
    assert set(b.ablation_maps) == {"grid_h4", "single_pass", "kl", "feature"}
    # smoke already scores on the H/4 grid with one pass: both variants equal Eq. 11 itself.
    assert torch.allclose(b.ablation_maps["grid_h4"], b.anomaly)
    assert torch.allclose(b.ablation_maps["single_pass"], b.anomaly)


def test_term_ablations_are_calibrated_as_eq_11_is() -> None:
    """"KL only" and "feature only" are Eq. 11 at alpha 1 and 0: the raw terms without a
    calibration, with one the terms as the ensemble reads them (per position too)."""
    m = _smoke_model(**{"score.ablations": "[kl,feature]"})
    plain = _batch(m, _images(2), 0.5, 0)
    assert torch.equal(plain.ablation_maps["kl"], plain.components.kl)
    assert torch.equal(plain.ablation_maps["feature"], plain.components.feature)
    shape = tuple(plain.anomaly.shape[-2:])
    cal = MapCalibration(kl_mean=0.5, kl_std=2.0, feature_mean=0.1, feature_std=0.5,
                         position_means=PositionMaps(kl=torch.linspace(0, 1, shape[0] * shape[1]).view(shape),
                                                      feature=torch.full(shape, 0.25)))
    b = _batch(m, _images(2), 0.5, 0, calibration=cal)
    torch.testing.assert_close(b.ablation_maps["kl"], (b.components.kl - cal.position_means.kl) / 2.0)
    torch.testing.assert_close(b.ablation_maps["feature"], (b.components.feature - 0.25) / 0.5)
    torch.testing.assert_close(b.anomaly, 0.5 * b.ablation_maps["kl"] + 0.5 * b.ablation_maps["feature"])


def test_score_batch_rejects_bad_input(model: _Model) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        _batch(model, torch.zeros(2, 1, SIZE, SIZE), 0.5, 0)


def _prepared(n: int, category: str = "weave") -> PreparedSplit:
    imgs = _images(n, seed=5).numpy()
    masks = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    masks[1::2, 4:10, 4:10] = 1
    labels = np.array([i % 2 for i in range(n)])
    return PreparedSplit(category, "test", imgs, masks, labels,
                         ["good" if lb == 0 else "spot" for lb in labels],
                         [f"{category}/test/x/{i:03d}.png" for i in range(n)])


def test_score_split_streams_records() -> None:
    m = _smoke_model(**{"score.batch_size": 2, "score.ablations": "[rgb]"})
    m.unet = spy = _Spy(m.unet)
    gen = score_split(m, _prepared(5), m.cfg.score, alpha=0.5, seed=0, progress=False)
    assert isinstance(gen, Iterator)
    assert spy.calls == []  # lazy: nothing computed before the first record is asked for
    first = next(gen)
    assert len(spy.calls) == 1  # only the first batch
    rest = list(gen)
    assert len(spy.calls) == 3  # 5 images in batches of 2
    records = [first, *rest]
    assert [r.rel_path for r in records] == _prepared(5).rel_paths
    r = records[1]
    assert isinstance(r, ScoreRecord)
    assert r.anomaly_map.shape == (SIZE, SIZE) and r.anomaly_map.dtype == np.float32
    assert r.label == 1 and r.defect_type == "spot" and r.mask.sum() == 36
    assert set(r.ablation_scores) == {"rgb"} and r.ablation_maps["rgb"].shape == (SIZE, SIZE)
    again = list(score_split(m, _prepared(5), m.cfg.score, alpha=0.5, seed=0, progress=False))
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(records, again))


def test_golden_anomaly_map_sum() -> None:
    m = _smoke_model(seed=0)
    b = _batch(m, _images(2, seed=1), 0.5, 0)
    total = float(b.anomaly.double().sum())
    assert total == pytest.approx(GOLDEN_SUM, rel=1e-4)


GOLDEN_SUM = 334.446226  # smoke UNet + random lite0 target, seed 0, two fixed images


# ----------------------------------------------------------------------------- whitened residual
def _residual_reference(residual: np.ndarray, precision: np.ndarray | None, size: int) -> np.ndarray:
    """Eq. 11's second term by loops: per t and grid cell r^T P r / C (P = I: the mean square),
    upsampled bilinearly per t by torch (the interpolation itself is not under test), mean over t."""
    n_t, b, c, g, _ = residual.shape
    err = np.zeros((n_t, b, g, g))
    for t in range(n_t):
        p = np.eye(c) if precision is None else (np.diag(precision[t]) if precision.ndim == 2 else precision[t])
        for i in range(b):
            for y in range(g):
                for x in range(g):
                    r = residual[t, i, :, y, x].astype(np.float64)
                    err[t, i, y, x] = r @ p @ r / c
    up = F.interpolate(torch.from_numpy(err).float().view(n_t * b, 1, g, g), size=(size, size),
                       mode="bilinear", align_corners=False)
    return up[:, 0].view(n_t, b, size, size).mean(dim=0).numpy()


def _residuals(seed: int = 0, n_t: int = 3, b: int = 4, c: int = 5, g: int = 4,
               spread: float = 2.0) -> torch.Tensor:
    """Correlated residuals: independent components of scales 10^-spread to 10^spread, mixed
    by a rotation (so their second-moment matrix has those squared scales as eigenvalues)."""
    gen = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(c, c, generator=torch.Generator().manual_seed(99)))[0]
    z = torch.randn(n_t, b, g, g, c, generator=gen) * torch.logspace(-spread, spread, c)
    return (z @ rotation.T).permute(0, 1, 4, 2, 3).contiguous()


def test_feature_term_matches_the_reference_for_every_whitening() -> None:
    residual = _residuals()
    r = residual.numpy()
    np.testing.assert_allclose(feature_term(residual, None, (8, 8)).numpy(), _residual_reference(r, None, 8),
                               rtol=1e-5)
    for kind in ("diagonal", "full"):
        w = fit_feature_whitening(_residuals(seed=1), kind)
        assert tuple(w.precision.shape) == ((3, 5) if kind == "diagonal" else (3, 5, 5))
        np.testing.assert_allclose(feature_term(residual, w, (8, 8)).numpy(),
                                   _residual_reference(r, w.precision.double().numpy(), 8), rtol=1e-4)


def test_whitening_fitted_on_normals_gives_them_unit_mean_and_undoes_channel_scales() -> None:
    normal = _residuals(seed=2, b=64)
    diag = fit_feature_whitening(normal, "diagonal")
    # Per t, the mean of sum_c r_c^2 / s_{t,c} over the fitting data is C, so the term's mean is 1,
    # whatever the channels' scales (here 0.01 to 100).
    assert torch.allclose(feature_term(normal, diag, (4, 4)).mean(), torch.tensor(1.0), atol=1e-4)
    # The full matrix: the same less the ridge's share, trace(S (S + lambda I)^-1) / C. The
    # ridge is 1% of the mean variance, so channels 10^4 below it are weighed down: the mean
    # is near 1 only for channels of comparable scales.
    full_wide = fit_feature_whitening(normal, "full")
    assert float(feature_term(normal, full_wide, (4, 4)).mean()) < 0.5
    normal = _residuals(seed=2, b=64, spread=0.3)
    full = fit_feature_whitening(normal, "full")
    assert 0.95 < float(feature_term(normal, full, (4, 4)).mean()) < 1.0
    # What each is invariant to, fitted on normals changed the same way as the test residuals:
    # "diagonal" to any scale per channel, "full" to a rotation of the channels and one overall
    # scale (its ridge follows the mean variance); the paper's plain mean square to neither.
    test = _residuals(seed=3, spread=0.3)
    scales = torch.logspace(-2, 2, 5).view(1, 1, 5, 1, 1)
    rotation = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(4)))[0]

    def rotated(x: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.einsum("dc,tbcyx->tbdyx", rotation, x)

    def invariant(kind: str, change) -> bool:  # noqa: ANN001
        before = feature_term(test, fit_feature_whitening(normal, kind), (4, 4))
        after = feature_term(change(test), fit_feature_whitening(change(normal), kind), (4, 4))
        return torch.allclose(before, after, rtol=1e-3, atol=1e-6)

    assert invariant("diagonal", lambda x: x * scales) and invariant("full", rotated)
    assert not invariant("diagonal", rotated) and not invariant("full", lambda x: x * scales)
    plain = feature_term(test, None, (4, 4))
    assert not torch.allclose(plain / plain.mean(), (lambda m: m / m.mean())(feature_term(test * scales, None, (4, 4))),
                              rtol=0.1)


def test_joint_whitening_weighs_all_steps_of_a_place_at_once() -> None:
    """"joint" (bench/tune_cpu_joint_rule.md): per grid cell, the residuals of every step
    concatenated (t-major) as r, the term r^T P r / (|T| C), upsampled; no mean over t. It is
    invariant to any rotation of those |T| C values (mixing steps too), which "full" is not."""
    normal, test = _residuals(seed=5, b=48, spread=0.3), _residuals(seed=6, spread=0.3)
    w = fit_feature_whitening(normal, "joint")
    n_t, b, c, g, _ = test.shape
    assert tuple(w.precision.shape) == (n_t * c, n_t * c)
    p = w.precision.double().numpy()
    err = np.zeros((b, g, g))
    for i in range(b):
        for y in range(g):
            for x in range(g):
                r = np.concatenate([test[t, i, :, y, x].double().numpy() for t in range(n_t)])
                err[i, y, x] = r @ p @ r / (n_t * c)
    expected = F.interpolate(torch.from_numpy(err).float().unsqueeze(1), size=(8, 8), mode="bilinear",
                             align_corners=False)[:, 0]
    assert torch.allclose(feature_term(test, w, (8, 8)), expected, rtol=1e-4, atol=1e-6)
    mix = torch.linalg.qr(torch.randn(n_t * c, n_t * c, generator=torch.Generator().manual_seed(7)))[0]

    def mixed(x: torch.Tensor) -> torch.Tensor:  # a rotation of the |T| C values of each place
        flat = torch.einsum("kl,bxyl->bxyk", mix, x.permute(1, 3, 4, 0, 2).reshape(x.shape[1], g, g, n_t * c))
        return flat.reshape(x.shape[1], g, g, n_t, c).permute(3, 0, 4, 1, 2).contiguous()

    for kind, invariant in (("joint", True), ("full", False)):
        before = feature_term(test, fit_feature_whitening(normal, kind), (4, 4))
        after = feature_term(mixed(test), fit_feature_whitening(mixed(normal), kind), (4, 4))
        assert torch.allclose(before, after, rtol=1e-3, atol=1e-6) is invariant, kind
    with pytest.raises(ValueError, match="joint feature whitening was fitted for 15 values"):
        feature_term(_residuals(n_t=2), w, (4, 4))
    again = MapCalibration.from_dict(json.loads(json.dumps(
        MapCalibration(kl_mean=0, kl_std=1, feature_mean=0, feature_std=1, whitening=w).to_dict())))
    assert again.whitening == w


def test_whitening_fitted_for_other_steps_or_channels_is_refused() -> None:
    w = fit_feature_whitening(_residuals(n_t=2), "full")
    with pytest.raises(ValueError, match="scoring steps, channels"):
        feature_term(_residuals(n_t=3), w, (4, 4))


def test_component_maps_return_the_residual_their_feature_map_is_made_of(model: _Model) -> None:
    x = _images(3)
    plain = component_maps(model, x, "weave", model.cfg.score, torch.Generator().manual_seed(0),
                           with_residual=True)
    n_t = len(model.cfg.diffusion.score_timesteps)
    assert plain.feature_residual.shape[:3] == (n_t, 3, model.feature_target.channels)
    assert torch.equal(plain.feature, feature_term(plain.feature_residual, None, (SIZE, SIZE)))
    w = fit_feature_whitening(plain.feature_residual, "full")
    cal = MapCalibration(kl_mean=0.0, kl_std=1.0, feature_mean=0.0, feature_std=1.0, whitening=w)
    scored = _batch(model, x, 0.0, 0, calibration=cal)
    assert torch.allclose(scored.anomaly, feature_term(plain.feature_residual, w, (SIZE, SIZE)), rtol=1e-4)
    assert scored.components.feature_residual is None  # kept only when asked for


def test_calibration_with_whitening_survives_its_record() -> None:
    w = fit_feature_whitening(_residuals(), "diagonal")
    cal = MapCalibration(kl_mean=0.5, kl_std=2.0, feature_mean=1.0, feature_std=3.0, n_images=4, whitening=w)
    again = MapCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal and again.whitening.kind == "diagonal"
    assert MapCalibration.from_dict({"kl_mean": 0, "kl_std": 1, "feature_mean": 0, "feature_std": 1}).whitening is None


def test_several_noise_draws_average_the_prediction_and_the_kl_map() -> None:
    """``score.noise_draws`` = K: the KL map is the mean of the K single-draw KL maps, and the
    feature residual is the head's prediction averaged over the K draws minus the target (so
    the mean of the single-draw residuals), whitened as one residual."""
    k = 3
    many = _smoke_model(**{"score.noise_draws": k})
    one = _smoke_model()
    x = _images(2, seed=4)
    n_t = len(one.cfg.diffusion.score_timesteps)
    noise = torch.randn(k * n_t, *x.shape, generator=torch.Generator().manual_seed(9))
    draws = [component_maps(one, x, "weave", one.cfg.score, noise=noise[d * n_t:(d + 1) * n_t],
                            with_residual=True) for d in range(k)]
    maps = component_maps(many, x, "weave", many.cfg.score, noise=noise, with_residual=True, with_rgb=True)
    residual = torch.stack([d.feature_residual for d in draws]).mean(dim=0)
    assert torch.allclose(maps.kl, torch.stack([d.kl for d in draws]).mean(dim=0), atol=1e-5)
    assert torch.allclose(maps.feature_residual, residual, atol=1e-5)
    assert torch.allclose(maps.feature, feature_term(residual, None, (SIZE, SIZE)), atol=1e-5)
    # Averaging the prediction first is not averaging the squared errors.
    assert not torch.allclose(maps.feature, torch.stack([d.feature for d in draws]).mean(dim=0), rtol=1e-2)
    w = fit_feature_whitening(residual, "full")
    assert torch.allclose(component_maps(many, x, "weave", many.cfg.score, noise=noise, whitening=w).feature,
                          feature_term(residual, w, (SIZE, SIZE)), atol=1e-5)
    with pytest.raises(ValueError, match=r"noise must be"):
        component_maps(many, x, "weave", many.cfg.score, noise=noise[:n_t])


def test_score_batch_draws_the_noise_of_every_draw_from_one_generator() -> None:
    """K = 1 draws exactly the noise it drew before the option existed; K draws the K*|T| rows
    from the same generator in draw-major order, the first draw's rows first."""
    one, many = _smoke_model(), _smoke_model(**{"score.noise_draws": 2})
    x = _images(2)
    n_t = len(one.cfg.diffusion.score_timesteps)
    noise = torch.randn(2 * n_t, *x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_batch(one, x, 0.5, 3).components.feature,
                       component_maps(one, x, "weave", one.cfg.score, noise=noise[:n_t]).feature)
    assert torch.equal(_batch(many, x, 0.5, 3).components.feature,
                       component_maps(many, x, "weave", many.cfg.score, noise=noise).feature)


def test_kl_scale_variants_of_eq11_first_term() -> None:
    """``score.kl_scale`` (bench/tune_cpu_klscale_rule.md): "per_image" normalises every row
    (draw, t, image) by its own mean and std before the means (the paper); "bits" averages the
    bits over channels and draws at each t, then over t; "log_bits" averages the log2 of those
    per-t maps over t. Reference by explicit loops over draws and steps."""
    k, n_t, b, c, h, w = 2, 3, 2, 3, 4, 5
    gen = torch.Generator().manual_seed(0)
    bits = torch.rand(k * n_t * b, c, h, w, generator=gen) * torch.linspace(0.1, 30.0, k * n_t * b).view(-1, 1, 1, 1)
    settings = {v: load_config("smoke", overrides=["score.calibrate_maps=true", f"score.kl_scale={v}"]).score
                for v in ("per_image", "bits", "log_bits")}
    rows = bits.view(k, n_t, b, c, h, w)
    per_step = torch.stack([torch.stack([rows[d, i].mean(dim=1) for d in range(k)]).mean(dim=0)
                            for i in range(n_t)])  # (|T|, B, H, W)
    assert torch.allclose(kl_term(bits, settings["bits"], k, n_t), per_step.mean(dim=0), atol=1e-5)
    assert torch.allclose(kl_term(bits, settings["log_bits"], k, n_t), per_step.log2().mean(dim=0), atol=1e-5)
    unbiased = settings["per_image"].kl_unbiased_std
    normalised = torch.stack([torch.stack([_normalise_per_image(rows[d, i], unbiased).mean(dim=1)
                                           for i in range(n_t)]) for d in range(k)])
    assert torch.allclose(kl_term(bits, settings["per_image"], k, n_t),
                          normalised.flatten(0, 1).mean(dim=0), atol=1e-5)
    # What each one keeps: one scale for everything leaves per_image alone, scales bits and
    # shifts log_bits; a scale per step becomes a constant offset in log_bits.
    assert torch.allclose(kl_term(4 * bits, settings["per_image"], k, n_t),
                          kl_term(bits, settings["per_image"], k, n_t), atol=1e-5)
    assert torch.allclose(kl_term(4 * bits, settings["bits"], k, n_t), 4 * kl_term(bits, settings["bits"], k, n_t))
    step_scale = torch.tensor([1.0, 8.0, 64.0]).repeat_interleave(b).repeat(k).view(-1, 1, 1, 1)
    assert torch.allclose(kl_term(bits * step_scale, settings["log_bits"], k, n_t),
                          kl_term(bits, settings["log_bits"], k, n_t) + 3.0, atol=1e-4)
    zeros = torch.zeros(n_t * b, c, h, w)  # a perfect model: floored, never -inf
    assert torch.isfinite(kl_term(zeros, settings["log_bits"], 1, n_t)).all()


def test_kl_scale_reaches_the_scored_maps() -> None:
    """The setting is what component_maps computes: its "bits" map is the mean over draws and
    steps of the KL bits of the same x_t, and the feature term does not change."""
    from diffad_core.diffusion import kl_map_bits, model_timesteps, q_sample

    over = {"score.calibrate_maps": "true", "score.noise_draws": 2}
    paper_kl, bits_kl = _smoke_model(**over), _smoke_model(**over, **{"score.kl_scale": "bits"})
    x = _images(2, seed=5)
    steps = paper_kl.cfg.diffusion.score_timesteps
    noise = torch.randn(2 * len(steps), *x.shape, generator=torch.Generator().manual_seed(2))
    ours = component_maps(bits_kl, x, "weave", bits_kl.cfg.score, noise=noise)
    theirs = component_maps(paper_kl, x, "weave", paper_kl.cfg.score, noise=noise)
    s = bits_kl.schedule
    expected = torch.zeros(2, SIZE, SIZE)
    for row in range(noise.shape[0]):
        t = torch.full((2,), steps[row % len(steps)], dtype=torch.long)
        x_t = q_sample(s, x, t, noise[row])
        out, _ = bits_kl.unet(x_t, model_timesteps(s, t), None)
        expected += kl_map_bits(s, out, x, x_t, t, clip=True).mean(dim=1) / noise.shape[0]
    assert torch.allclose(ours.kl, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(ours.feature, theirs.feature)
    assert not torch.allclose(ours.kl, theirs.kl)


def test_unnormalised_kl_needs_the_calibration() -> None:
    with pytest.raises(Exception, match=r"score.kl_scale=bits needs score.calibrate_maps"):
        load_config("smoke", overrides=["score.kl_scale=bits"])
    with pytest.raises(Exception, match="kl_scale"):
        load_config("smoke", overrides=["score.calibrate_maps=true", "score.kl_scale=linear"])


def test_noise_draws_must_be_positive() -> None:
    with pytest.raises(Exception, match="noise_draws"):
        load_config("smoke", overrides=["score.noise_draws=0"])
