"""The frozen feature target F(x_0) of METHOD.md §2.

EfficientNet-b4 (paper) outputs at strides 2, 4, 8, 16 (24 + 32 + 56 + 160 = 272 channels; the
official code's efficientnet_pytorch blocks 1, 5, 9 and 21), each resized bilinearly
(align_corners=False) straight to the target grid and concatenated in that order. The grid is
H/4 x W/4 (training, the official ``feat_shape`` 64), or ``size`` x ``size`` (the official test
script's 16). With ``imagenet_norm=False`` (official) the raw [-1, 1] image goes in; with True it is
mapped to [0, 1] and normalised with the backbone's pretrained mean/std. ``static_same_padding``
fixes every conv's TF "same" pad for that input size (efficientnet_pytorch's behaviour, see
``same_padding``). With ``image_size`` (ours, issue #8) the input is the image at that larger size
and the caller asks for the UNet's grid; maps larger than the grid are then pooled with an
antialiased (area-weighted) resize, so a detail one grid cell wide is averaged in, not skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffad_core.config import FeatureTargetConfig
from diffad_core.nets.backbones import load_backbone, normalisation_stats
from diffad_core.nets.same_padding import PadRecord, apply_static_same_padding

__all__ = ["FeatureTarget", "resize_concat"]


def resize_concat(features: list[torch.Tensor], size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Resize each (B, C_i, h_i, w_i) map bilinearly (align_corners=False) to ``size``; concat.
    ``antialias`` low-passes the maps that shrink (torch's antialiased bilinear)."""
    return torch.cat(
        [f if tuple(f.shape[-2:]) == size
         else F.interpolate(f, size=size, mode="bilinear", align_corners=False, antialias=antialias)
         for f in features],
        dim=1,
    )


class FeatureTarget(nn.Module):
    """Frozen timm backbone giving the (B, channels, H/4, W/4) regression target.

    ``forward(x, size=None)``: ``size=s`` gives (B, channels, s, s) instead, each stage resized
    directly to s x s (the official test script), not the H/4 map resized.

    Always in eval mode (``train()`` is overridden) and computed without gradients: it is only a
    target. (PaDiM, which needs gradients w.r.t. its input, does not use this class.)
    """

    def __init__(self, cfg: FeatureTargetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = load_backbone(cfg.weights, cfg.out_indices)
        self.static_pads: list[PadRecord] = []
        if cfg.static_same_padding is not None:
            self.static_pads = apply_static_same_padding(self.backbone, cfg.static_same_padding)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.channels_per_layer = [int(c) for c in self.backbone.feature_info.channels()]
        self.channels = sum(self.channels_per_layer)
        self.imagenet_norm = cfg.imagenet_norm
        self.antialias = cfg.image_size is not None
        mean, std = normalisation_stats(self.backbone)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureTarget:
        """Stay in eval mode: BatchNorm statistics of the target must not change."""
        return super().train(False)

    def forward(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FeatureTarget: expected x of shape (B, 3, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(f"FeatureTarget: H and W must be multiples of 4, got {h}x{w}")
        if size is not None and int(size) < 1:
            raise ValueError(f"FeatureTarget: size must be >= 1 or None, got {size}")
        grid = (h // 4, w // 4) if size is None else (int(size), int(size))
        with torch.no_grad():
            inp = (x + 1) / 2 if self.imagenet_norm else x
            if self.imagenet_norm:
                inp = (inp - self.mean.to(inp.dtype)) / self.std.to(inp.dtype)
            feats = self.backbone(inp)
            return resize_concat(list(feats), grid, self.antialias).contiguous()  # NCHW for channels-last weights
