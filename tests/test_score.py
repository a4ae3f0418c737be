"""Anomaly scoring (METHOD.md §3, Eq. 11) and the "Ours*" alpha choice."""

from __future__ import annotations

import types
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from diffad_core import score
from diffad_core.config import load_config
from diffad_core.diffusion import diffusion_schedules
from diffad_core.score import (
    ScoreRecord,
    _normalise_per_image,
    default_top_k,
    score_batch,
    score_split,
    synthesize_anomalies,
    top_k_mean,
)

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _smoke_model(seed: int = 0, **score_overrides: object) -> types.SimpleNamespace:
    """A deterministic, untrained smoke-size DiffadModel (same fields as train.load_model's)."""
    from diffad_core.nets import FeatureTarget, UNet

    overrides = [f"score.{k}={v}" for k, v in score_overrides.items()]
    cfg = load_config("smoke", overrides=overrides)
    torch.manual_seed(seed)
    target = FeatureTarget(cfg.features).eval()
    unet = UNet(cfg.unet, cfg.data.image_size, feature_channels=target.channels).eval()
    # The ADM output conv starts at zero; give it weights so eps and v are non-trivial.
    with torch.no_grad():
        for p in unet.out.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    _, respaced = diffusion_schedules(cfg.diffusion.steps, cfg.diffusion.beta_start,
                                      cfg.diffusion.beta_end, cfg.diffusion.respacing)
    return types.SimpleNamespace(cfg=cfg, unet=unet, feature_target=target, padim=None,
                                 schedule=respaced, class_index={"weave": 0},
                                 device=torch.device("cpu"), meta={"categories": ["weave"]})


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def model() -> types.SimpleNamespace:
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


def test_kl_normalisation_is_per_image_over_chw() -> None:
    x = torch.randn(3, 3, 8, 8) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1, 1, 1) + 7.0
    z = _normalise_per_image(x)
    flat = z.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(3), atol=1e-5)


def test_score_batch_shapes_and_determinism(model: types.SimpleNamespace) -> None:
    x = _images()
    a = score_batch(model, x, "weave", 0.5, torch.Generator().manual_seed(3))
    b = score_batch(model, x, "weave", 0.5, torch.Generator().manual_seed(3))
    c = score_batch(model, x, "weave", 0.5, torch.Generator().manual_seed(4))
    for name in ("anomaly_map", "kl_map", "feature_map", "rgb_map"):
        assert getattr(a, name).shape == (2, SIZE, SIZE), name
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.image_score.shape == (2,)
    assert not torch.equal(a.kl_map, c.kl_map)
    # KL maps are normalised per (image, t) before averaging: their mean stays 0.
    assert torch.allclose(a.kl_map.mean(dim=(1, 2)), torch.zeros(2), atol=1e-5)
    assert (a.feature_map >= 0).all() and (a.rgb_map >= 0).all()
    k = default_top_k(SIZE)
    assert torch.allclose(a.image_score, top_k_mean(a.anomaly_map, k))


def test_alpha_extremes_select_one_map(model: types.SimpleNamespace) -> None:
    x = _images()
    kl_only = score_batch(model, x, "weave", 1.0, torch.Generator().manual_seed(0))
    feat_only = score_batch(model, x, "weave", 0.0, torch.Generator().manual_seed(0))
    half = score_batch(model, x, "weave", 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(kl_only.anomaly_map, kl_only.kl_map)
    assert torch.equal(feat_only.anomaly_map, feat_only.feature_map)
    assert torch.allclose(half.anomaly_map, 0.5 * half.kl_map + 0.5 * half.feature_map)
    with pytest.raises(ValueError, match="alpha"):
        score_batch(model, x, "weave", 1.5, torch.Generator().manual_seed(0))


class _Spy(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, list[int]]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        self.calls.append((x.shape[0], t.tolist()))
        return self.inner(x, t, y)


def test_one_batched_forward_with_mapped_timesteps() -> None:
    m = _smoke_model()
    spy = _Spy(m.unet)
    m.unet = spy
    score_batch(m, _images(2), "weave", 0.5, torch.Generator().manual_seed(0))
    # respaced indices 5, 50, 100 of the 250-step chain are original steps 20, 201, 401
    assert spy.calls == [(6, [20, 20, 201, 201, 401, 401])]

    quirk = _smoke_model(official_timestep_quirk=True)
    spy_q = _Spy(quirk.unet)
    quirk.unet = spy_q
    score_batch(quirk, _images(2), "weave", 0.5, torch.Generator().manual_seed(0))
    assert spy_q.calls == [(6, [5, 5, 50, 50, 100, 100])]


def test_score_batch_rejects_bad_input(model: types.SimpleNamespace) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        score_batch(model, torch.zeros(2, 1, SIZE, SIZE), "weave")


def _prepared(n: int, category: str = "weave") -> types.SimpleNamespace:
    imgs = _images(n, seed=5).numpy()
    masks = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    masks[1::2, 4:10, 4:10] = 1
    labels = np.array([i % 2 for i in range(n)])
    return types.SimpleNamespace(
        images=imgs, masks=masks, labels=labels,
        defect_types=["good" if lb == 0 else "spot" for lb in labels],
        rel_paths=[f"{category}/test/x/{i:03d}.png" for i in range(n)], category=category,
    )


def test_score_split_streams_records() -> None:
    m = _smoke_model(batch_size=2, ablations="[rgb]")
    spy = _Spy(m.unet)
    m.unet = spy
    gen = score_split(m, _prepared(5), seed=0, progress=False)
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
    again = list(score_split(m, _prepared(5), seed=0, progress=False))
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(records, again))


def test_synthesize_anomalies_masks_are_exact_and_seeded() -> None:
    imgs = _images(6, seed=2).numpy()
    out, masks = synthesize_anomalies(imgs, seed=11)
    out2, masks2 = synthesize_anomalies(imgs, seed=11)
    assert np.array_equal(out, out2) and np.array_equal(masks, masks2)
    assert out.shape == imgs.shape and masks.shape == (6, SIZE, SIZE) and masks.dtype == np.uint8
    changed = np.abs(out - imgs).max(axis=1) > 1e-6
    assert np.array_equal(changed, masks.astype(bool))
    assert (masks.reshape(6, -1).sum(1) > 0).all()
    assert out.min() >= -1 and out.max() <= 1


def test_choose_alpha_never_reads_the_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffad_core.data as data
    import diffad_core.train as train

    m = _smoke_model(alpha_grid="[0.0, 0.5, 1.0]")
    train_split = _prepared(10)
    train_split.labels = np.zeros(10, dtype=np.int64)
    seen: list[str] = []

    def fake_prepare_split(cfg, category, split):  # noqa: ANN001, ANN202
        seen.append(split)
        if split != "train":
            raise AssertionError(f"choose_alpha read the {split!r} split")
        return train_split

    monkeypatch.setattr(data, "prepare_split", fake_prepare_split)
    _, val_idx = train.split_train_validation(10, m.cfg)
    choice = score.choose_alpha(m, m.cfg, "weave")
    assert seen == ["train"]
    assert choice.alpha in (0.0, 0.5, 1.0)
    assert set(choice.validation_pro) == {0.0, 0.5, 1.0}
    assert choice.validation_pro[choice.alpha] == max(choice.validation_pro.values())
    assert choice.n_validation_images == 2 * len(val_idx)
    assert "held-out train/good" in choice.source


def test_golden_anomaly_map_sum() -> None:
    m = _smoke_model(seed=0)
    b = score_batch(m, _images(2, seed=1), "weave", 0.5, torch.Generator().manual_seed(0))
    total = float(b.anomaly_map.double().sum())
    assert total == pytest.approx(GOLDEN_SUM, rel=1e-4)


GOLDEN_SUM = 334.446226  # smoke UNet + random lite0 target, seed 0, two fixed images
