"""Static TF "same" padding fixed for 380 px, as efficientnet_pytorch's b4 (METHOD.md §2).

Random weights only (no downloads). The expected pads are worked out by hand from TF's rule:
out = ceil(i / s), total = max((out - 1) * s + k - i, 0), the odd pixel after.
"""

import pytest
import timm
import torch
import torch.nn.functional as F

from diffad_core.config import FeatureTargetConfig, WeightsConfig, load_config
from diffad_core.nets import FeatureTarget, apply_static_same_padding
from diffad_core.nets.same_padding import StaticSamePadConv2d, same_pad, static_same_pads

B4 = "tf_efficientnet_b4.aa_in1k"
# b4 at 380 px: the stem and the first conv of each strided stage (sizes 380, 190, 95, 48, 24)
STATIC_380 = {
    "conv_stem": ((380, 380), (0, 1, 0, 1)),  # k3 s2: 189 * 2 + 3 - 380 = 1
    "blocks.1.0.conv_dw": ((190, 190), (0, 1, 0, 1)),  # k3 s2: 94 * 2 + 3 - 190 = 1
    "blocks.2.0.conv_dw": ((95, 95), (2, 2, 2, 2)),  # k5 s2: 47 * 2 + 5 - 95 = 4
    "blocks.3.0.conv_dw": ((48, 48), (0, 1, 0, 1)),  # k3 s2: 23 * 2 + 3 - 48 = 1
    "blocks.5.0.conv_dw": ((24, 24), (1, 2, 1, 2)),  # k5 s2: 11 * 2 + 5 - 24 = 3
}


def _b4(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(B4, pretrained=False, features_only=True,
                             out_indices=(0, 1, 2, 3)).eval()


def test_same_pad_arithmetic():
    assert same_pad(380, 3, 2) == (0, 1)
    assert same_pad(95, 5, 2) == (2, 2)
    assert same_pad(64, 5, 2) == (1, 2)  # what timm computes at 256 px for the stride-8 conv
    assert same_pad(24, 5, 2) == (1, 2)
    assert same_pad(7, 3, 1) == (1, 1) and same_pad(7, 5, 1) == (2, 2)
    assert same_pad(8, 1, 2) == (0, 0)


def test_b4_pads_for_380_px():
    records = static_same_pads(_b4(), 380)
    strided = {r.name: (r.input_size, r.pad) for r in records if r.stride != (1, 1)}
    assert strided == STATIC_380
    for r in records:  # every stride-1 conv is padded symmetrically, (k - 1) / 2
        if r.stride == (1, 1):
            k = r.kernel_size[0]
            assert r.pad == ((k - 1) // 2,) * 4, r.name


def test_propagated_sizes_are_those_a_380_px_image_reaches():
    with torch.device("meta"):
        model = timm.create_model(B4, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3))
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(
                lambda _m, args, name=name: seen.__setitem__(name, tuple(args[0].shape[-2:])))
    model(torch.empty(1, 3, 380, 380, device="meta"))
    records = static_same_pads(model, 380)
    assert len(records) == 33
    assert all(seen[r.name] == r.input_size for r in records)


def test_static_padding_keeps_parameters_and_names():
    model = _b4()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_static_same_padding(model, 380)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    for name, (_, pad) in STATIC_380.items():
        conv = model.get_submodule(name)
        assert isinstance(conv, StaticSamePadConv2d) and conv.static_pad == pad
    assert type(model.get_submodule("blocks.2.1.conv_dw")) is torch.nn.Conv2d  # already (2, 2)


def test_at_256_px_static_differs_from_timm_from_stride_8_on():
    dynamic = _b4(seed=3)
    static = _b4(seed=3)
    apply_static_same_padding(static, 380)
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    seen = {}
    conv = static.get_submodule("blocks.2.0.conv_dw")
    conv.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        f_dyn, f_sta = dynamic(x), static(x)
    # stem and stride-4 conv: same pad at 256 and 380, so identical features
    assert torch.equal(f_dyn[0], f_sta[0]) and torch.equal(f_dyn[1], f_sta[1])
    # the 5x5 stride-2 conv on 64x64: timm pads 1/2, the static model 2/2
    assert [tuple(f.shape[-2:]) for f in f_sta] == [(128, 128), (64, 64), (32, 32), (16, 16)]
    for a, b in zip(f_dyn[2:], f_sta[2:], strict=True):
        assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)
    w = conv.weight
    explicit = F.conv2d(F.pad(seen["x"], (2, 2, 2, 2)), w, None, 2, 0, 1, w.shape[0])
    assert torch.allclose(seen["y"], explicit, atol=1e-5)
    timm_like = F.conv2d(F.pad(seen["x"], (1, 2, 1, 2)), w, None, 2, 0, 1, w.shape[0])
    assert not torch.allclose(seen["y"], timm_like, atol=1e-3)


def test_stem_is_an_explicit_pad_and_conv():
    model = _b4(seed=4)
    apply_static_same_padding(model, 380)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        y = model.conv_stem(x)
        expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), model.conv_stem.weight, None, 2)
    assert torch.allclose(y, expected, atol=1e-6)


def test_at_the_native_size_static_equals_dynamic():
    dynamic = _b4(seed=5)
    static = _b4(seed=5)
    apply_static_same_padding(static, 380)
    x = torch.rand(1, 3, 380, 380) * 2 - 1
    with torch.no_grad():
        for a, b in zip(dynamic(x), static(x), strict=True):
            assert torch.allclose(a, b, atol=1e-6)


def test_unsupported_backbone_is_a_clear_error():
    resnet = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1,))
    with pytest.raises(ValueError, match="static_same_padding"):
        apply_static_same_padding(resnet, 224)


def test_paper_feature_target_defaults_and_grid():
    cfg = load_config("paper").features
    assert cfg.weights.timm_name == B4 and cfg.static_same_padding == 380
    assert cfg.imagenet_norm is False and cfg.out_indices == [0, 1, 2, 3]
    random = cfg.model_copy(update={"weights": WeightsConfig(timm_name=B4, pretrained=False)})
    torch.manual_seed(0)
    target = FeatureTarget(random)
    assert target.channels == 272
    # stages 5 and 6 feed no output and are dropped (nets.backbones._drop_unused_stages)
    assert {r.name: r.pad for r in target.static_pads if r.stride != (1, 1)} == {
        k: v[1] for k, v in STATIC_380.items() if not k.startswith(("blocks.5.", "blocks.6."))}
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        feats = target.backbone(x)  # raw [-1, 1] input
    out64, out16 = target(x), target(x, size=16)
    assert out64.shape == (1, 272, 64, 64) and out16.shape == (1, 272, 16, 16)
    # official test script: each stage resized straight to 16x16, then concatenated
    direct = torch.cat([F.interpolate(f, size=(16, 16), mode="bilinear", align_corners=False)
                        for f in feats], dim=1)
    assert torch.allclose(out16, direct, atol=1e-6)
    via_64 = F.interpolate(out64, size=(16, 16), mode="bilinear", align_corners=False)
    assert not torch.allclose(out16, via_64, atol=1e-4)
    with pytest.raises(ValueError, match="size"):
        target(x, size=0)


def test_refined_presets_keep_timm_padding_and_imagenet_norm():
    for preset in ("cpu-demo", "smoke"):
        cfg = load_config(preset).features
        assert cfg.static_same_padding is None and cfg.imagenet_norm is True
    demo = FeatureTarget(load_config("cpu-demo").features)
    assert demo.static_pads == []
    assert any(type(m).__name__ == "Conv2dSame" for m in demo.backbone.modules())
    with pytest.raises(ValueError, match="static_same_padding"):
        FeatureTargetConfig(static_same_padding=0)


def test_local_b4_file_is_loaded_then_padded(tmp_path):
    torch.manual_seed(6)
    full = timm.create_model(B4, pretrained=False)
    path = tmp_path / "b4.pth"
    torch.save(full.state_dict(), path)
    cfg = load_config("paper").features.model_copy(update={"weights": WeightsConfig(
        timm_name=B4, file=str(path), offline=True)})
    target = FeatureTarget(cfg)
    assert torch.equal(target.backbone.conv_stem.weight, full.conv_stem.weight)
    assert isinstance(target.backbone.conv_stem, StaticSamePadConv2d)
    assert torch.equal(target.backbone.blocks[2][0].conv_dw.weight, full.blocks[2][0].conv_dw.weight)
