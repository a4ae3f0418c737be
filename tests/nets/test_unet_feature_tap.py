"""Which decoder block the feature head reads, and the test-time feature grid (METHOD.md §2-3)."""

import pytest
import torch
import torch.nn.functional as F

from diffad_core.config import ConfigError, UNetConfig, load_config
from diffad_core.nets import UNet


def _randomise(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _smoke_unet(tap: str, **update) -> UNet:
    cfg = load_config("smoke").unet.model_copy(update={"feature_tap": tap, **update})
    net = UNet(cfg, 32, feature_channels=5)
    _randomise(net)
    return net.eval()


def _block_output(net: UNet, idx: int, x, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seen = {}
    handle = net.output_blocks[idx].register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("h", out))
    out, feat = net(x, t)
    handle.remove()
    return out, feat, seen["h"]


def test_paper_before_last_is_output_block_10():
    cfg = load_config("paper").unet
    assert cfg.feature_tap == "before_last"
    with torch.device("meta"):
        net = UNet(cfg, 256, feature_channels=272)
        last = UNet(cfg.model_copy(update={"feature_tap": "last"}), 256, feature_channels=272)
    assert net.feature_block == 10 and last.feature_block == 11
    # 64x64 level = output_blocks 9, 10, 11; only 11 ends with the upsampling res block
    assert len(net.output_blocks[10]) == 1 and not net.output_blocks[10][0].updown
    assert net.output_blocks[11][-1].updown
    shapes = {}
    for i in (9, 10, 11):
        net.output_blocks[i].register_forward_hook(
            lambda _m, _a, out, i=i: shapes.__setitem__(i, tuple(out.shape)))
    x = torch.empty(1, 3, 256, 256, device="meta")
    t, y = torch.zeros(1, dtype=torch.long, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
    out, feat = net(x, t, y)
    assert shapes == {9: (1, 512, 64, 64), 10: (1, 512, 64, 64), 11: (1, 512, 128, 128)}
    assert out.shape == (1, 6, 256, 256) and feat.shape == (1, 272, 64, 64)
    _, feat16 = net(x, t, y, feature_size=16)
    assert feat16.shape == (1, 272, 16, 16)


def test_before_last_reads_the_whole_block_before_the_last():
    net = _smoke_unet("before_last")
    # 8 px is the deepest level, first in the decoder: output blocks 0 (the tap) and 1
    assert net.feature_level == 2 and net.feature_block == 0
    assert _smoke_unet("last").feature_block == 1
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 400])
    _, feat, h = _block_output(net, net.feature_block, x, t)
    assert h.shape == (2, 32, 8, 8)
    assert torch.allclose(feat, net.feature_head(h), atol=1e-6)


def test_the_two_taps_give_different_heads_on_the_same_weights():
    before, last = _smoke_unet("before_last"), _smoke_unet("last")
    last.load_state_dict(before.state_dict())  # same parameter names and shapes
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([20])
    out_b, feat_b = before(x, t)
    out_l, feat_l = last(x, t)
    assert torch.equal(out_b, out_l)  # the tap does not change the diffusion output
    assert feat_b.shape == feat_l.shape and not torch.allclose(feat_b, feat_l, atol=1e-4)


def test_feature_size_resizes_the_tapped_block_before_the_head():
    net = _smoke_unet("before_last")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 50])
    out, _, h = _block_output(net, net.feature_block, x, t)
    out4, feat4 = net(x, t, feature_size=4)
    resized = F.interpolate(h, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(feat4, net.feature_head(resized), atol=1e-6)
    assert torch.equal(out4, out)  # the diffusion output does not depend on the feature grid
    # GroupNorm statistics depend on the grid: resizing the head's output is not the same
    after = F.interpolate(net.feature_head(h), size=(4, 4), mode="bilinear", align_corners=False)
    assert not torch.allclose(feat4, after, atol=1e-4)
    _, feat8 = net(x, t, feature_size=8)  # the native grid: no resize
    assert torch.equal(feat8, net(x, t)[1])
    with pytest.raises(ValueError, match="feature_size"):
        net(x, t, feature_size=0)


def test_last_tap_with_feature_size():
    net = _smoke_unet("last")
    seen = {}
    block = net.output_blocks[net.feature_block]
    block[-1].register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0]))
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([7])
    _, feat = net(x, t, feature_size=2)
    expected = net.feature_head(F.interpolate(seen["h"], size=(2, 2), mode="bilinear",
                                              align_corners=False))
    assert torch.allclose(feat, expected, atol=1e-6)


def test_before_last_needs_two_blocks_per_level():
    with pytest.raises(ValueError, match="feature_tap='before_last' needs"):
        UNetConfig(num_res_blocks=0)
    assert UNetConfig(num_res_blocks=0, feature_tap="last").num_res_blocks == 0
    with pytest.raises(ConfigError, match="feature_tap"):
        load_config("smoke", overrides=["unet.num_res_blocks=0", "unet.feature_tap=before_last"])
    cfg = UNetConfig.model_construct(**{**UNetConfig().model_dump(), "num_res_blocks": 0})
    with pytest.raises(ValueError, match="num_res_blocks >= 1"):  # the network checks it too
        UNet(cfg, 64)


def test_presets_pin_the_tap():
    assert load_config("paper").unet.feature_tap == "before_last"
    assert load_config("unified").unet.feature_tap == "before_last"
    assert load_config("cpu-demo").unet.feature_tap == "last"
    assert load_config("smoke").unet.feature_tap == "last"
