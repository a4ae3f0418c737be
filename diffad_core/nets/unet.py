"""ADM UNet ("improved diffusion with attention") with the feature head of METHOD.md §2.

The layout follows the ADM design (Dhariwal & Nichol): sinusoidal timestep embedding -> MLP,
optional label embedding added to it, residual blocks with GroupNorm-SiLU-conv and scale-shift
norm, self-attention at chosen resolutions, skip connections from encoder to decoder. Module
names mirror the ADM reference (``time_embed``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out``) and the attention uses its per-head [q, k, v] channel order, so an
ADM checkpoint maps onto this model key by key.

The feature head (METHOD.md §2) reads the decoder level whose resolution is 1/4 of the input
(64x64 for 256 px; ``cfg.feature_stride=2``: the level at 1/2, ours). ``cfg.feature_tap`` picks
the block: ``"before_last"`` is the block before the level's last one (the official code's
``output_blocks[10]`` at 256 px), ``"last"`` the level's last res/attention block, before its
upsampling layer. The head is GroupNorm -> SiLU -> 1x1 conv to ``feature_channels`` (not
zero-initialised: it regresses the frozen backbone features). ``forward(..., feature_size=s)``
resizes the tapped map bilinearly to s x s *before* the head, as the official test script does
(its ``feat_shape``, 16): GroupNorm statistics depend on the grid, so resizing the head's output
instead would give different numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffad_core.config import DiffadConfig, UNetConfig

__all__ = ["UNet", "build_unet", "group_norm", "model_summary", "timestep_embedding"]


def _num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` (32 for ADM widths)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    raise ValueError(f"cannot pick GroupNorm groups for {channels} channels")


class _GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (as ADM does), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, channels) groups (adjusted down to a divisor of ``channels``)."""
    return _GroupNorm32(_num_groups(channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t f_i), sin(t f_i)]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class _TimestepBlock(nn.Module):
    """Marker base: a block whose forward(x, emb) also takes the (timestep + label) embedding."""


class _EmbedSequential(nn.Sequential):
    """Sequential that passes the embedding to the blocks that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _TimestepBlock) else layer(x)
        return x


def _nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling of (B, C, H, W): ``F.interpolate(x, scale_factor=2,
    mode="nearest")`` exactly, as copies of an expanded view (channels-last stays channels-last);
    the CPU interpolate kernel copies the tensor three times and is 5x slower at 64 px (issue #11)."""
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(b, h, 2, w, 2, c)
        return nhwc.reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    return x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)


class _PointwiseConv(nn.Conv2d):
    """``nn.Conv2d(in, out, 1)`` (same parameters) computed on a CPU as a matmul over channels:
    torch's CPU conv dispatch sends 1x1 convs to a slow path that copies channels-last input to
    NCHW first (a fifth of the UNet's time at 64 px; issue #11)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        weight = self.weight.reshape(self.out_channels, self.in_channels)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return F.linear(x.permute(0, 2, 3, 1), weight, self.bias).permute(0, 3, 1, 2)
        b, _, h, w = x.shape
        out = torch.matmul(weight, x.reshape(b, self.in_channels, h * w))
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(b, self.out_channels, h, w)


class _Upsample(nn.Module):
    """Nearest x2 upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _nearest_2x(x)
        return self.conv(x) if self.use_conv else x


class _Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling without a conv."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op: nn.Module = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv
            else nn.AvgPool2d(kernel_size=2, stride=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class _ResBlock(_TimestepBlock):
    """GroupNorm-SiLU-conv twice with the embedding injected in between.

    With ``use_scale_shift_norm`` the embedding gives (scale, shift) applied after the second
    norm: ``norm(h) * (1 + scale) + shift`` (FiLM); else it is added to h. ``up``/``down``
    resample inside the block (ADM's ``resblock_updown``). The last conv is zero-initialised.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 use_scale_shift_norm: bool, up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.updown = up or down
        self.in_layers = nn.Sequential(
            group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        if up:
            self.h_upd: nn.Module = _Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = _Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = _Downsample(channels, use_conv=False)
            self.x_upd = _Downsample(channels, use_conv=False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            group_norm(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else _PointwiseConv(channels, out_channels)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
            h = conv(self.h_upd(norm_act(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = e.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class _AttentionBlock(nn.Module):
    """Spatial self-attention with ``channels // head_channels`` heads and a residual.

    The qkv conv's output channels are ordered per head as [q, k, v] (ADM's "legacy" order).
    """

    def __init__(self, channels: int, num_head_channels: int) -> None:
        super().__init__()
        if channels % num_head_channels != 0:
            raise ValueError(
                f"attention: {channels} channels are not divisible by num_head_channels="
                f"{num_head_channels}"
            )
        self.num_heads = channels // num_head_channels
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        n, heads = height * width, self.num_heads
        # Tokens (B, T, C), a view of channels-last x; the 1x1 convs as matmuls over channels.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.view(3 * c, c), self.qkv.bias)  # (B, T, 3C)
        # (B, heads, T, d) each; contiguous q, k, v let SDPA take its fused (flash) kernel on CPU
        # as on CUDA: 3x faster than its strided math fallback at 16x16 (issue #11).
        q, k, v = (part.contiguous() for part in
                   qkv.view(b, n, heads, 3 * c // heads).transpose(1, 2).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        h = F.linear(a.transpose(1, 2).reshape(b, n, c), self.proj_out.weight.view(c, c), self.proj_out.bias)
        return x + h.transpose(1, 2).view(b, c, height, width)


class UNet(nn.Module):
    """ADM UNet returning (model_out, features); see the module docstring.

    ``forward(x, t, y=None, feature_size=None)``: x (B, C, H, W), t (B,) original-chain
    timesteps, y (B,) class indices (required iff ``cfg.class_cond``). model_out has 2C channels
    with ``learn_sigma`` (eps and the learned-range variance v, METHOD.md §2) else C; features
    are (B, feature_channels, H/4, W/4), or (B, feature_channels, s, s) for ``feature_size=s``.
    Both come from one forward pass.
    """

    def __init__(self, cfg: UNetConfig, image_size: int, in_channels: int = 3,
                 feature_channels: int = 272) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if cfg.learn_sigma else in_channels
        self.feature_channels = feature_channels
        mc = cfg.base_channels
        mults = list(cfg.channel_mult)
        n_levels = len(mults)
        if image_size % (2 ** (n_levels - 1)) != 0:
            raise ValueError(
                f"UNet: image_size={image_size} is not divisible by 2**(levels-1)={2 ** (n_levels - 1)}"
            )
        if image_size % 4 != 0 or image_size // 4 < 1:
            raise ValueError(f"UNet: image_size={image_size} must be a positive multiple of 4")
        feature_res = image_size // cfg.feature_stride
        level_res = [image_size >> level for level in range(n_levels)]
        if feature_res not in level_res:
            raise ValueError(
                f"UNet: no decoder level at 1/{cfg.feature_stride} of the input ({feature_res}x{feature_res} for "
                f"image_size={image_size}); levels are at {level_res} px. Use at least 3 levels "
                f"in unet.channel_mult (got {mults})"
            )
        self.feature_level = level_res.index(feature_res)
        attn_res = set(cfg.attention_resolutions)
        emb_dim = 4 * mc

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.class_cond:
            if cfg.num_classes < 1:
                raise ValueError(f"UNet: class_cond needs num_classes >= 1, got {cfg.num_classes}")
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def res(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> _ResBlock:
            return _ResBlock(ch_in, emb_dim, cfg.dropout, ch_out, cfg.use_scale_shift_norm, up, down)

        ch = int(mults[0] * mc)
        self.input_blocks = nn.ModuleList([_EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        resolution = image_size
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if resolution in attn_res:
                    layers.append(_AttentionBlock(ch, cfg.num_head_channels))
                self.input_blocks.append(_EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != n_levels - 1:
                down: nn.Module = res(ch, ch, down=True) if cfg.resblock_updown else _Downsample(ch, True)
                self.input_blocks.append(_EmbedSequential(down))
                skip_chans.append(ch)
                resolution //= 2

        self.middle_block = _EmbedSequential(
            res(ch, ch), _AttentionBlock(ch, cfg.num_head_channels), res(ch, ch)
        )

        if cfg.feature_tap == "before_last" and cfg.num_res_blocks < 1:
            raise ValueError(
                "UNet: feature_tap='before_last' needs 2+ decoder blocks per level "
                f"(num_res_blocks >= 1, got {cfg.num_res_blocks}); use feature_tap='last'"
            )
        tap_i = cfg.num_res_blocks - 1 if cfg.feature_tap == "before_last" else cfg.num_res_blocks
        # "last": that block ends with the level's upsampling layer; tap just before it.
        self._tap_before_up = cfg.feature_tap == "last"
        self.output_blocks = nn.ModuleList()
        self._feature_block = -1
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mc * mult)]
                ch = mc * mult
                if resolution in attn_res:
                    layers.append(_AttentionBlock(ch, cfg.num_head_channels))
                if level == self.feature_level and i == tap_i:
                    self._feature_block = len(self.output_blocks)
                    feature_ch = ch
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else _Upsample(ch, True))
                    resolution *= 2
                self.output_blocks.append(_EmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )
        # METHOD.md §2 feature head; the conv keeps its default (non-zero) init.
        self.feature_head = nn.Sequential(
            group_norm(feature_ch), nn.SiLU(), _PointwiseConv(feature_ch, feature_channels)
        )

    @property
    def feature_block(self) -> int:
        """Index in ``output_blocks`` of the block the feature head reads."""
        return self._feature_block

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                feature_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet: expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"UNet: expected t of shape ({x.shape[0]},), got {tuple(t.shape)}")
        if self.cfg.class_cond:
            if y is None:
                raise ValueError("UNet: class-conditional model needs y (class indices)")
            if y.shape != (x.shape[0],):
                raise ValueError(f"UNet: expected y of shape ({x.shape[0]},), got {tuple(y.shape)}")
        elif y is not None:
            raise ValueError("UNet: y given but the model is not class-conditional (unet.class_cond)")
        if feature_size is not None and int(feature_size) < 1:
            raise ValueError(f"UNet: feature_size must be >= 1 or None, got {feature_size}")

        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        if self.cfg.class_cond:
            assert y is not None
            emb = emb + self.label_emb(y)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        feat_in: torch.Tensor | None = None
        for idx, block in enumerate(self.output_blocks):
            h = torch.cat([h, skips.pop()], dim=1)
            if idx == self._feature_block and self._tap_before_up:
                # the 1/4 level's last res(+attn) block; tap before its upsampling layer (last)
                h = block[:-1](h, emb)
                feat_in = h
                up = block[-1]
                h = up(h, emb) if isinstance(up, _TimestepBlock) else up(h)
            else:
                h = block(h, emb)
                if idx == self._feature_block:
                    feat_in = h  # the whole block's output (official: output_blocks[10])
        assert feat_in is not None
        size = int(feature_size) if feature_size is not None else None
        if size is not None and tuple(feat_in.shape[-2:]) != (size, size):
            # official test script: F.interpolate(h, (feat_shape,)*2, mode="bilinear") before
            # the head (align_corners False); METHOD.md §3
            feat_in = F.interpolate(feat_in, size=(size, size), mode="bilinear", align_corners=False)
        # NCHW out whatever the weights' memory format (runtime.prepare_for_inference)
        return self.out(h).contiguous(), self.feature_head(feat_in).contiguous()


def build_unet(cfg: DiffadConfig, feature_channels: int) -> UNet:
    """The UNet for a resolved config (RGB in, built for ``cfg.network_size``: the training crop,
    else the image size)."""
    return UNet(cfg.unet, cfg.network_size, in_channels=3, feature_channels=feature_channels)


def model_summary(cfg: DiffadConfig) -> dict[str, Any]:
    """Resolved network config and parameter count, without loading or allocating weights.

    Feature channels come from the target backbone's timm ``feature_info`` (built with
    ``pretrained=False``); the UNet is built on the meta device.
    """
    from diffad_core.nets.backbones import backbone_channels

    per_layer = backbone_channels(cfg.features.weights.timm_name, cfg.features.out_indices)
    feature_channels = sum(per_layer)
    size = cfg.network_size
    with torch.device("meta"):
        model = UNet(cfg.unet, size, in_channels=3, feature_channels=feature_channels)
    head = sum(p.numel() for p in model.feature_head.parameters())
    return {
        "unet": cfg.unet.model_dump(mode="json"),
        "image_size": size,
        "in_channels": 3,
        "out_channels": model.out_channels,
        "feature_target": {
            "timm_name": cfg.features.weights.timm_name,
            "out_indices": list(cfg.features.out_indices),
            "channels_per_layer": per_layer,
            "imagenet_norm": cfg.features.imagenet_norm,
            "static_same_padding": cfg.features.static_same_padding,
        },
        "feature_channels": feature_channels,
        "feature_resolution": size // cfg.unet.feature_stride,
        "feature_block": f"output_blocks[{model.feature_block}] ({cfg.unet.feature_tap})",
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameters_feature_head": head,
    }
