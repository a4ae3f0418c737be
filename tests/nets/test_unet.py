import pytest
import torch
import torch.nn.functional as F

from diffad_core.config import load_config
from diffad_core.nets import UNet, build_unet, model_summary
from diffad_core.nets.unet import _AttentionBlock, group_norm, timestep_embedding

ADM_256_COND_PARAMS = 553_838_086  # OpenAI 256x256 class-conditional ADM (1000 classes, 6 ch out)


def _randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Overwrite every parameter (incl. zero-initialised convs) with small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _unet_cfg(preset: str, **update):
    return load_config(preset).unet.model_copy(update=update)


@pytest.mark.parametrize("preset", ["smoke", "cpu-demo"])
@pytest.mark.parametrize("class_cond", [False, True])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_and_feature_shapes(preset, class_cond, learn_sigma):
    cfg = load_config(preset)
    ucfg = cfg.unet.model_copy(update={"class_cond": class_cond, "learn_sigma": learn_sigma,
                                       "num_classes": 4})
    size = cfg.data.image_size
    net = UNet(ucfg, size, in_channels=3, feature_channels=20)
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([0, 3]) if class_cond else None
    out, feat = net(x, torch.tensor([0, 999]), y)
    assert out.shape == (2, 6 if learn_sigma else 3, size, size)
    assert feat.shape == (2, 20, size // 4, size // 4)


def test_build_unet_uses_config_image_size():
    cfg = load_config("smoke")
    net = build_unet(cfg, feature_channels=7)
    assert net.image_size == 32 and net.feature_channels == 7 and net.feature_level == 2


def test_zero_init_output_but_not_feature_head():
    net = UNet(_unet_cfg("smoke"), 32, feature_channels=5)
    out, feat = net(torch.randn(2, 3, 32, 32), torch.tensor([10, 20]))
    assert torch.count_nonzero(out) == 0  # ADM zero-initialises the output conv
    assert feat.abs().sum() > 0  # the regression head must not start at zero
    assert net.feature_head[2].weight.abs().sum() > 0


def test_deterministic_given_seed():
    torch.manual_seed(3)
    a = UNet(_unet_cfg("smoke", dropout=0.1), 32, feature_channels=5)
    torch.manual_seed(3)
    b = UNet(_unet_cfg("smoke", dropout=0.1), 32, feature_channels=5)
    _randomise(a)
    _randomise(b)
    a.eval()
    b.eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 600])
    oa, fa = a(x, t)
    ob, fb = b(x, t)
    assert torch.equal(oa, ob) and torch.equal(fa, fb)
    oa2, _ = a(x, t)
    assert torch.equal(oa, oa2)


def test_timestep_and_label_change_the_output():
    net = UNet(_unet_cfg("smoke", class_cond=True, num_classes=3), 32, feature_channels=5)
    _randomise(net)
    x = torch.randn(1, 3, 32, 32)
    o1, f1 = net(x, torch.tensor([10]), torch.tensor([0]))
    o2, f2 = net(x, torch.tensor([500]), torch.tensor([0]))
    o3, f3 = net(x, torch.tensor([10]), torch.tensor([2]))
    assert not torch.allclose(o1, o2) and not torch.allclose(f1, f2)
    assert not torch.allclose(o1, o3) and not torch.allclose(f1, f3)


def test_every_parameter_gets_a_gradient():
    net = UNet(_unet_cfg("smoke", class_cond=True, num_classes=2), 32, feature_channels=5)
    _randomise(net)
    out, feat = net(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), torch.tensor([0, 1]))
    (out.square().mean() + feat.square().mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_conv_resampling_without_resblock_updown():
    net = UNet(_unet_cfg("smoke", resblock_updown=False, use_scale_shift_norm=False), 32,
               feature_channels=5)
    out, feat = net(torch.randn(1, 3, 32, 32), torch.tensor([7]))
    assert out.shape == (1, 6, 32, 32) and feat.shape == (1, 5, 8, 8)


def test_no_quarter_level_is_a_clear_error():
    with pytest.raises(ValueError, match="no decoder level at 1/4"):
        UNet(_unet_cfg("smoke", channel_mult=[1, 2]), 32)


def test_bad_inputs_are_clear_errors():
    net = UNet(_unet_cfg("smoke", class_cond=True, num_classes=2), 32, feature_channels=5)
    with pytest.raises(ValueError, match="needs y"):
        net(torch.randn(1, 3, 32, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match="expected x"):
        net(torch.randn(1, 1, 32, 32), torch.tensor([1]), torch.tensor([0]))
    uncond = UNet(_unet_cfg("smoke"), 32, feature_channels=5)
    with pytest.raises(ValueError, match="not class-conditional"):
        uncond(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.tensor([0]))


def test_group_norm_groups_handle_small_widths():
    assert group_norm(256).num_groups == 32
    assert group_norm(16).num_groups == 16
    assert group_norm(48).num_groups == 24
    assert group_norm(6).num_groups == 6


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 3]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


def test_attention_matches_direct_per_head_qkv_computation():
    torch.manual_seed(0)
    block = _AttentionBlock(8, num_head_channels=4)
    _randomise(block)
    x = torch.randn(2, 8, 3, 3)
    flat = x.reshape(2, 8, 9)
    qkv = block.qkv(block.norm(flat)).reshape(2, 2, 12, 9)  # per head: [q | k | v]
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:8], qkv[:, :, 8:]
    w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / 2.0, dim=-1)  # sqrt(4) = 2
    a = torch.einsum("bhts,bhcs->bhct", w, v).reshape(2, 8, 9)
    expected = (flat + block.proj_out(a)).reshape(2, 8, 3, 3)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_adm_parameter_names():
    keys = set(UNet(_unet_cfg("smoke", class_cond=True, num_classes=2), 32).state_dict())
    for key in ("time_embed.0.weight", "label_emb.weight", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
                "middle_block.1.qkv.weight", "middle_block.1.proj_out.weight",
                "output_blocks.0.0.skip_connection.weight", "out.2.weight", "feature_head.2.weight"):
        assert key in keys, key


def test_paper_unet_is_the_adm_256_model():
    cfg = load_config("paper")
    adm = cfg.unet.model_copy(update={"num_classes": 1000})
    with torch.device("meta"):
        net = UNet(adm, 256, feature_channels=272)
    head = sum(p.numel() for p in net.feature_head.parameters())
    assert head == 2 * 512 + 512 * 272 + 272  # GroupNorm + 1x1 conv on the 64x64 level (512 ch)
    assert sum(p.numel() for p in net.parameters()) - head == ADM_256_COND_PARAMS


def test_model_summary_paper():
    s = model_summary(load_config("paper"))
    assert s["feature_channels"] == 272
    assert s["feature_target"]["channels_per_layer"] == [24, 32, 56, 160]
    assert s["image_size"] == 256 and s["out_channels"] == 6 and s["feature_resolution"] == 64
    expected = ADM_256_COND_PARAMS + s["parameters_feature_head"]
    assert abs(s["parameters"] - expected) / expected < 0.005
    assert s["unet"]["channel_mult"] == [1, 1, 2, 2, 4, 4]


def test_feature_head_reads_the_quarter_level_before_upsampling():
    net = UNet(_unet_cfg("cpu-demo"), 64, feature_channels=5)
    _randomise(net)
    block = net.output_blocks[net._feature_block]
    seen = {}

    def _keep_input(_module, args):
        seen["h"] = args[0]

    block[-1].register_forward_pre_hook(_keep_input)
    _, feat = net(torch.randn(1, 3, 64, 64), torch.tensor([3]))
    assert seen["h"].shape == (1, 64, 16, 16)  # 1/4 of 64 px, channel_mult[2] * 32 channels
    assert torch.allclose(feat, net.feature_head(seen["h"]))


def test_pointwise_conv_is_a_1x1_conv_in_both_memory_formats():
    """The CPU matmul form of the UNet's 1x1 convs (issue #11) equals nn.Conv2d's."""
    from diffad_core.nets.unet import _PointwiseConv

    torch.manual_seed(0)
    conv = _PointwiseConv(6, 4)
    x = torch.randn(2, 6, 5, 3)
    expected = F.conv2d(x, conv.weight, conv.bias)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    got = conv(x.contiguous(memory_format=torch.channels_last))
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, expected, atol=1e-6)
    assert set(conv.state_dict()) == {"weight", "bias"} and conv.weight.shape == (4, 6, 1, 1)


def test_nearest_upsampling_equals_interpolate_and_keeps_the_memory_format():
    from diffad_core.nets.unet import _nearest_2x

    x = torch.randn(2, 5, 3, 4)
    expected = F.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.equal(_nearest_2x(x), expected) and _nearest_2x(x).is_contiguous()
    cl = _nearest_2x(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(cl, expected) and cl.is_contiguous(memory_format=torch.channels_last)
