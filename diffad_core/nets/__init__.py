"""Networks: the ADM UNet with its feature head, the frozen feature target, PaDiM, backbones.

See docs/internals.md ("Networks") for the contracts and METHOD.md §2 and §4 for the method.
"""

from diffad_core.nets.backbones import (
    WeightsError,
    backbone_channels,
    create_timm_model,
    file_sha256,
    load_backbone,
    lukemelas_to_timm,
    resolve_weights_file,
)
from diffad_core.nets.features import FeatureTarget
from diffad_core.nets.padim import Padim
from diffad_core.nets.unet import UNet, build_unet, model_summary, unet_parameter_count

__all__ = [
    "FeatureTarget",
    "Padim",
    "UNet",
    "WeightsError",
    "backbone_channels",
    "build_unet",
    "create_timm_model",
    "file_sha256",
    "load_backbone",
    "lukemelas_to_timm",
    "model_summary",
    "resolve_weights_file",
    "unet_parameter_count",
]
