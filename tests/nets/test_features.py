import pytest
import torch
import torch.nn.functional as F

from diffad_core.config import FeatureTargetConfig, WeightsConfig, load_config
from diffad_core.nets import FeatureTarget, backbone_channels


def _random_b0(imagenet_norm: bool = True) -> FeatureTargetConfig:
    # efficientnet_b0 uses ImageNet mean/std (Lite0's 0.5/0.5 would map [-1, 1] onto itself)
    return FeatureTargetConfig(
        weights=WeightsConfig(timm_name="efficientnet_b0", pretrained=False),
        imagenet_norm=imagenet_norm,
    )


def test_b4_has_272_channels():
    assert backbone_channels("efficientnet_b4", [0, 1, 2, 3]) == [24, 32, 56, 160]
    cfg = load_config("paper").features.model_copy(
        update={"weights": WeightsConfig(timm_name="efficientnet_b4", pretrained=False)}
    )
    target = FeatureTarget(cfg)
    assert target.channels == 272
    assert target(torch.rand(1, 3, 32, 32) * 2 - 1).shape == (1, 272, 8, 8)


def test_lite0_package_target_channels_and_shape():
    features = load_config("cpu-demo", overrides=["features.out_indices=[0,1,2,3]"]).features
    target = FeatureTarget(features)  # pretrained Lite0 from the package, strides 2-16
    assert target.channels == 16 + 24 + 40 + 112
    out = target(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.shape == (2, 192, 16, 16) and torch.isfinite(out).all()
    demo = FeatureTarget(load_config("cpu-demo").features)  # the preset: strides 4 and 8
    assert demo.channels == 24 + 40
    assert demo(torch.rand(1, 3, 64, 64) * 2 - 1).shape == (1, 64, 16, 16)


def test_normalised_input_and_resizing():
    torch.manual_seed(0)
    target = FeatureTarget(_random_b0())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert target.backbone.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    mean = torch.tensor(target.backbone.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(target.backbone.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = target.backbone(((x + 1) / 2 - mean) / std)
    expected = torch.cat([F.interpolate(f, size=(8, 8), mode="bilinear", align_corners=False)
                          for f in feats], dim=1)
    assert torch.allclose(target(x), expected, atol=1e-6)


def test_imagenet_norm_flag_changes_the_output():
    torch.manual_seed(0)
    norm = FeatureTarget(_random_b0(True))
    torch.manual_seed(0)
    raw = FeatureTarget(_random_b0(False))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        direct = torch.cat([F.interpolate(f, size=(8, 8), mode="bilinear", align_corners=False)
                            for f in raw.backbone(x)], dim=1)
    assert torch.allclose(raw(x), direct, atol=1e-6)  # raw [-1, 1] input, as the official code
    assert not torch.allclose(norm(x), raw(x), atol=1e-3)


def test_frozen_and_always_eval():
    target = FeatureTarget(_random_b0())
    target.train()
    assert not target.training and not target.backbone.training
    assert all(not p.requires_grad for p in target.parameters())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    assert not target(x).requires_grad
    with pytest.raises(ValueError, match="multiples of 4"):
        target(torch.rand(1, 3, 30, 30))
