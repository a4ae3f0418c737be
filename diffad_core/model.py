"""The trained model: its checkpoint folder, the frozen networks around the UNet, load and save.

A checkpoint folder (docs/internals.md "Model") holds:
  model.safetensors   EMA UNet weights (written LAST: its presence marks a finished folder)
  padim.safetensors   fitted PaDiM statistics (no backbone weights; rebuilt from the config)
  config.json         the resolved config (``config_from_dict`` rebuilds it)
  meta.json           categories, class_index, steps, feature_channels, image_size, versions,
                      train_seconds, final_loss, losses, init_report, held_out, seed
  train_state.pt      only while training: what ``train_model(resume=True)`` continues from

Training (``train.py``), scoring (``score.py``) and reconstruction (``reconstruct.py``) all sit
above this module; none of them imports another.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffad_core import __version__
from diffad_core._atomic import atomic_write
from diffad_core.config import DiffadConfig, config_from_dict, diffad_home
from diffad_core.diffusion import Schedule, diffusion_schedules
from diffad_core.nets import FeatureTarget, Padim, build_unet
from diffad_core.runtime import select_device

MODEL_FILE = "model.safetensors"
FINAL_FILES: tuple[str, ...] = ("padim.safetensors", "config.json", "meta.json", MODEL_FILE)


@dataclasses.dataclass
class DiffadModel:
    """A loaded model: everything scoring and reconstruction need (never their settings:
    those are passed to them with each call)."""

    cfg: DiffadConfig
    unet: nn.Module
    feature_target: nn.Module
    padim: nn.Module
    schedule: Schedule  # the respaced chain (METHOD.md §3)
    class_index: dict[str, int]
    device: torch.device
    meta: dict[str, Any]
    folder: Path | None = None

    @property
    def categories(self) -> list[str]:
        return list(self.meta.get("categories") or self.class_index)

    def class_labels(self, category: str, n: int) -> torch.Tensor | None:
        """Class index per item when the UNet is class-conditional (METHOD.md §2), else None."""
        if not self.cfg.unet.class_cond:
            return None
        if category not in self.class_index:
            known = ", ".join(sorted(self.class_index)) or "none"
            raise ValueError(f"category {category!r} is not one the model was trained on (known: {known})")
        return torch.full((n,), int(self.class_index[category]), dtype=torch.long, device=self.device)

    def held_out(self, category: str) -> list[int]:
        """Indices of the category's train/good images the trainer left out (may be empty)."""
        return [int(i) for i in (self.meta.get("held_out") or {}).get(category, [])]


def checkpoint_dir(cfg: DiffadConfig, label: str, key: str) -> Path:
    """The one checkpoint layout: ``<DIFFAD_HOME>/checkpoints/<dataset>/<label>/<key>``.

    ``label`` is the category (or ``unified``); ``key`` names one training (the pipeline uses
    its cache key, the CLI the model hash of the config).
    """
    return diffad_home().resolve() / "checkpoints" / cfg.data.dataset / label / key


def versions() -> dict[str, str]:
    """Library versions recorded with a checkpoint."""
    return {"torch": torch.__version__, "timm": timm.__version__, "diffad": __version__,
            "numpy": np.__version__}


# ----------------------------------------------------------------------------- frozen nets
def build_feature_target(cfg: DiffadConfig) -> FeatureTarget:
    """The frozen feature target (METHOD.md §2), built under a fixed seed (cfg.seed) so that
    random-weight backbones (smoke, tests) are the same in training and in ``load_model``; the
    global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        target = FeatureTarget(cfg.features)
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval()


def build_padim(cfg: DiffadConfig) -> Padim:
    """PaDiM (METHOD.md §4) built under a fixed seed (cfg.padim.seed); see build_feature_target."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.padim.seed))
        return Padim(cfg.padim, cfg.data.image_size)


def diffusion_schedule(cfg: DiffadConfig) -> tuple[Schedule, Schedule]:
    """(training chain, respaced chain) of a config (METHOD.md §2-3)."""
    d = cfg.diffusion
    return diffusion_schedules(d.steps, d.beta_start, d.beta_end, d.respacing)


# ----------------------------------------------------------------------------- files
def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


def save_model(folder: Path, cfg: DiffadConfig, ema_unet: nn.Module, padim: Padim,
               meta: dict[str, Any]) -> None:
    """Write a finished checkpoint folder; ``model.safetensors`` last, as the finished marker."""
    padim_stats = {k: v for k, v in padim.state_dict().items() if not k.startswith("backbone.")}
    save_safetensors(folder / "padim.safetensors", padim_stats)
    write_json(folder / "config.json", cfg.to_dict())
    write_json(folder / "meta.json", meta)
    save_safetensors(folder / MODEL_FILE, ema_unet.state_dict(),
                     metadata={"format": "pt", "what": "EMA UNet", "config_hash": cfg.config_hash()})


def finished_meta(folder: Path) -> dict[str, Any] | None:
    """meta.json of a finished checkpoint folder (all final files there), else None."""
    if not all((folder / name).is_file() for name in FINAL_FILES):
        return None
    meta = json.loads((folder / "meta.json").read_text())
    return meta if meta.get("complete") else None


def stored_config(folder: Path) -> DiffadConfig:
    return config_from_dict(json.loads((folder / "config.json").read_text()))


def load_model(checkpoint_dir: str | Path, device: str | torch.device | None = None) -> DiffadModel:
    """Rebuild a trained model from its checkpoint folder (EMA UNet in eval mode) on ``device``
    (default: CUDA if available, else CPU). A missing file is a FileNotFoundError naming the
    folder and the file."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    for name in FINAL_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint folder {folder} has no {name} (an unfinished or "
                                    "partial training?)")
    try:
        cfg = stored_config(folder)
        meta = json.loads((folder / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint folder {folder}: unreadable JSON: {exc}") from exc
    # None: "auto" here, not the training machine's runtime.device (a model loads anywhere).
    dev = select_device(device if device is not None else "auto")
    feature_target = build_feature_target(cfg).to(dev)
    channels = int(meta.get("feature_channels", feature_target.channels))
    if channels != int(feature_target.channels):
        raise ValueError(f"checkpoint folder {folder}: meta.json says {channels} feature channels, "
                         f"the configured feature target gives {feature_target.channels}")
    unet = build_unet(cfg, channels)
    try:
        unet.load_state_dict(load_file(str(folder / MODEL_FILE)))
    except RuntimeError as exc:
        raise ValueError(f"checkpoint folder {folder}: {MODEL_FILE} does not match the config: {exc}") from exc
    unet = unet.to(dev).eval()
    padim = build_padim(cfg)
    missing, unexpected = padim.load_state_dict(load_file(str(folder / "padim.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint folder {folder}: padim.safetensors does not match the config "
                         f"(missing {missing}, unexpected {unexpected})")
    padim = padim.to(dev).eval()
    _, schedule = diffusion_schedule(cfg)
    class_index = {str(k): int(v) for k, v in meta.get("class_index", {}).items()}
    return DiffadModel(cfg=cfg, unet=unet, feature_target=feature_target, padim=padim,
                       schedule=schedule, class_index=class_index, device=dev, meta=meta,
                       folder=folder)
