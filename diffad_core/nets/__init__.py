"""Networks: the ADM UNet with its feature head, the frozen feature target, PaDiM, backbones.

Also the OpenAI ADM initialisation (``adm_init``) and static "same" padding (``same_padding``).

See docs/internals.md ("Networks") for the contracts and METHOD.md §2 and §4 for the method.
"""

from diffad_core.nets.adm_init import (
    ADM_SOURCES,
    AdmInitError,
    InitReport,
    InitWeights,
    load_adm_init,
    prepare_init_checkpoint,
)
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
from diffad_core.nets.same_padding import apply_static_same_padding
from diffad_core.nets.unet import UNet, build_unet, model_summary

__all__ = [
    "ADM_SOURCES",
    "AdmInitError",
    "FeatureTarget",
    "InitReport",
    "InitWeights",
    "Padim",
    "UNet",
    "WeightsError",
    "apply_static_same_padding",
    "backbone_channels",
    "build_unet",
    "create_timm_model",
    "file_sha256",
    "load_adm_init",
    "load_backbone",
    "lukemelas_to_timm",
    "model_summary",
    "prepare_init_checkpoint",
    "resolve_weights_file",
]
