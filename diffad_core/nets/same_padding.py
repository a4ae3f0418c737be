"""Static TensorFlow "same" padding for timm EfficientNets, fixed for one input size.

The official feature target (METHOD.md §2) is efficientnet_pytorch's EfficientNet-b4 built with
its native image size (380 px): every conv gets the TF "same" pad computed once, for the size
that reaches it when a 380 px image goes through the net, and keeps that pad for any input.
That size starts at the image size and is divided by each strided conv's stride, rounding up
(efficientnet_pytorch's ``calculate_output_image_size``, applied after the stem and after the
first block of each stage). timm's ``tf_`` models instead pad for the actual input
(``Conv2dSame``), so at 256 px the first conv of the stride-8 stage (5x5, stride 2) is padded
1/2 rather than 2/2, which changes the stride-8 and stride-16 features.

``apply_static_same_padding(model, image_size)`` swaps each such conv for a
``StaticSamePadConv2d`` holding the same weight and bias Parameters (state_dict keys unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PadRecord", "StaticSamePadConv2d", "apply_static_same_padding", "same_pad",
           "static_same_pads"]


def same_pad(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) TF "same" pad of one spatial dimension of length ``size``.

    The output has ceil(size / stride) positions; the total pad is split with the extra pixel
    after (right/bottom), as TF, efficientnet_pytorch and timm do.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


@dataclass(frozen=True)
class PadRecord:
    """One conv's fixed pad: ``pad`` is (left, right, top, bottom), as ``F.pad`` takes it."""

    name: str
    input_size: tuple[int, int]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]


class StaticSamePadConv2d(nn.Conv2d):
    """A conv that zero-pads its input by a fixed (left, right, top, bottom) and then convolves.

    Built from an existing conv and sharing its weight and bias Parameters.
    """

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size,
                         stride=conv.stride, padding=0, dilation=conv.dilation,
                         groups=conv.groups, bias=conv.bias is not None, device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        self.static_pad = tuple(int(p) for p in pad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, static_pad={self.static_pad}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.static_pad):
            x = F.pad(x, self.static_pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _check_supported(model: nn.Module) -> None:
    if not (hasattr(model, "conv_stem") and hasattr(model, "blocks")):
        raise ValueError(
            f"static_same_padding needs a timm EfficientNet-style model (conv_stem + blocks), "
            f"got {type(model).__name__}; set features.static_same_padding=null"
        )
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in ("MixedConv2d", "CondConv2d"):
            raise ValueError(f"static_same_padding: {name} is a {kind}, which is not supported; "
                             "set features.static_same_padding=null")


def static_same_pads(model: nn.Module, image_size: int) -> list[PadRecord]:
    """The fixed pad of every spatial or strided conv, in execution order, for ``image_size``.

    Walks the convs in registration order (= execution order in timm EfficientNets), starting at
    ``image_size`` and dividing by each stride with ceil, as efficientnet_pytorch propagates its
    ``image_size``. 1x1 stride-1 convs (expansion, projection, squeeze-excitation on pooled maps)
    neither pad nor change the size and are skipped.
    """
    _check_supported(model)
    h = w = int(image_size)
    records: list[PadRecord] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        if (kh, kw, sh, sw) == (1, 1, 1, 1):
            continue
        top, bottom = same_pad(h, kh, sh, dh)
        left, right = same_pad(w, kw, sw, dw)
        records.append(PadRecord(name, (h, w), (kh, kw), (sh, sw), (left, right, top, bottom)))
        h, w = math.ceil(h / sh), math.ceil(w / sw)
    return records


def _keeps_its_padding(module: nn.Conv2d, pad: tuple[int, int, int, int]) -> bool:
    """A plain conv whose symmetric padding already equals ``pad`` (e.g. 3x3 stride 1)."""
    if type(module) is not nn.Conv2d or isinstance(module.padding, str):
        return False
    ph, pw = module.padding
    return pad == (pw, pw, ph, ph) and module.padding_mode == "zeros"


def apply_static_same_padding(model: nn.Module, image_size: int) -> list[PadRecord]:
    """Give every conv of ``model`` the pad it would have for a ``image_size`` input, in place.

    timm's dynamic ``Conv2dSame`` convs (and plain convs whose padding differs) are replaced by
    ``StaticSamePadConv2d``; plain convs whose symmetric padding already equals the static pad
    are left as they are. Returns the pad of each spatial/strided conv.
    """
    records = static_same_pads(model, image_size)
    for rec in records:
        module = model.get_submodule(rec.name)
        assert isinstance(module, nn.Conv2d)
        if _keeps_its_padding(module, rec.pad):
            continue
        parent_name, _, child = rec.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StaticSamePadConv2d(module, rec.pad))
    return records
