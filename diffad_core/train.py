"""Training and loading of a diffad model (METHOD.md §2; DESIGN.md "train.py").

``train_model`` trains the ADM UNet with the hybrid loss (eps MSE + variance-only VB term +
feature loss), AdamW with a linear learning-rate anneal to 0, an EMA of the weights, autocast
on CUDA, periodic atomic checkpoints with exact resume, then fits PaDiM on the training images
and writes the checkpoint folder of docs/internals.md. ``load_model`` reads it back.

Checkpoint folder (``out_dir``):
  model.safetensors   EMA UNet weights (written LAST: its presence marks a finished folder)
  padim.safetensors   fitted PaDiM statistics
  config.json         the resolved config (``config_from_dict`` rebuilds it)
  meta.json           categories, class_index, steps, feature_channels, image_size, versions,
                      train_seconds, final_loss, losses, init_report, held_out
  train_state.pt      raw weights, EMA, optimizer, lr schedule, GradScaler, step, RNG states,
                      data position: what ``resume=True`` continues from
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import random
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffad_core._atomic import atomic_write
from diffad_core.config import DiffadConfig, config_from_dict
from diffad_core.diffusion import Schedule, diffusion_schedules, training_losses

FINAL_FILES: tuple[str, ...] = ("padim.safetensors", "config.json", "meta.json", "model.safetensors")
STATE_FILE = "train_state.pt"
_STATE_FORMAT = 1
_log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """Training cannot start or continue (inconsistent checkpoint folder, bad inputs)."""


@dataclasses.dataclass
class TrainResult:
    """What ``train_model`` returns (docs/internals.md "Training")."""

    checkpoint_dir: Path
    steps: int
    seconds: float
    losses: list[tuple[int, float]]
    final_loss: float
    init_report: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DiffadModel:
    """A loaded model: everything scoring and reconstruction need."""

    cfg: DiffadConfig
    unet: nn.Module
    feature_target: nn.Module
    padim: nn.Module
    schedule: Schedule
    class_index: dict[str, int]
    device: torch.device
    meta: dict[str, Any]


# ----------------------------------------------------------------------------- device / amp
def select_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> the first visible CUDA device if any (CUDA_VISIBLE_DEVICES is respected by
    torch itself), else CPU; ``cpu``, ``cuda``, ``cuda:<i>`` as asked, with a clear error when
    the CUDA device is not there."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TrainError(
                f"runtime.device={spec!r} asks for CUDA, but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                "use runtime.device=auto or cpu"
            )
        if spec.startswith("cuda:"):
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise TrainError(f"runtime.device={spec!r}: expected cuda:<index>") from None
            count = torch.cuda.device_count()
            if not 0 <= index < count:
                raise TrainError(f"runtime.device={spec!r}: only {count} CUDA device(s) visible")
            return torch.device("cuda", index)
        return torch.device("cuda")
    raise TrainError(f"runtime.device={spec!r} is not one of auto, cpu, cuda, cuda:<i>")


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: full fp32).

    auto: bf16 on CUDA when supported, else fp16; fp32 elsewhere. bf16/fp16 force that dtype
    (bf16 also works on CPU; fp16 needs CUDA). off: fp32.
    """
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        supported = torch.cuda.is_bf16_supported()
        if amp == "bf16":
            if not supported:
                raise TrainError(f"train.amp=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support")
            return torch.bfloat16
        if amp == "auto":
            return torch.bfloat16 if supported else torch.float16
    elif device.type == "cpu":
        if amp == "bf16":
            return torch.bfloat16
        if amp == "fp16":
            raise TrainError("train.amp=fp16 needs a CUDA device; use auto, bf16 or off on CPU")
        if amp == "auto":
            return None
    elif amp == "auto":
        return None
    else:
        raise TrainError(f"train.amp={amp!r} is not supported on device {device}")
    raise TrainError(f"train.amp={amp!r} is not one of auto, bf16, fp16, off")


def autocast_context(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``amp_dtype(device, amp)``, or a no-op context for fp32."""
    device = torch.device(device)
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- splits / seeds
def split_train_validation(
    n: int, fraction: float | DiffadConfig, seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, validation_idx) over ``n`` train/good images, both sorted.

    ``round(n * fraction)`` images (at least 1 when fraction > 0, and never all of them) are
    held out, chosen by ``numpy.random.default_rng(seed).permutation(n)``. Pass either
    ``(n, cfg.score.validation_fraction, cfg.seed)`` or ``(n, cfg)``; both give the same split.
    """
    if isinstance(fraction, DiffadConfig):
        seed = fraction.seed if seed is None else seed
        fraction = fraction.score.validation_fraction
    if seed is None:
        raise ValueError("split_train_validation needs a seed")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = 0
    if fraction > 0 and n >= 2:
        n_val = min(max(1, int(round(n * float(fraction)))), n - 1)
    perm = np.random.default_rng(int(seed)).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def _run_seed(cfg: DiffadConfig, categories: list[str]) -> int:
    """cfg.seed plus a stable (crc32) offset per category set."""
    return int(cfg.seed) + zlib.crc32("|".join(sorted(categories)).encode()) % 1_000_003


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- files
def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config that define the trained model (DiffadConfig.model_definition)."""
    return config_from_dict(cfg_dict).model_definition()


def _versions() -> dict[str, str]:
    import timm

    from diffad_core import __version__

    return {"torch": torch.__version__, "timm": timm.__version__, "diffad": __version__,
            "numpy": np.__version__}


# ----------------------------------------------------------------------------- init checkpoint
def _read_init_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TrainError(f"train.init_checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file's name
        raise TrainError(f"train.init_checkpoint {path} is not a readable torch state_dict: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TrainError(f"train.init_checkpoint {path} does not hold a state_dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def init_from_checkpoint(unet: nn.Module, path: str | Path) -> list[str]:
    """Copy the tensors of an OpenAI ADM checkpoint whose names and shapes match ours.

    The label embedding is dropped (METHOD.md §2). Returns a report: one line per dropped,
    shape-mismatched, missing (kept at our init) or unused key; nothing here is fatal except
    an unreadable file.
    """
    src = _read_init_state_dict(Path(path))
    own = unet.state_dict()
    report: list[str] = []
    merged: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key.startswith("label_emb."):
            report.append(f"dropped (label embedding): {key}")
        elif key not in own:
            report.append(f"unused (not in our UNet): {key} {tuple(value.shape)}")
        elif tuple(value.shape) != tuple(own[key].shape):
            report.append(f"shape mismatch, kept ours: {key} checkpoint {tuple(value.shape)} "
                          f"vs model {tuple(own[key].shape)}")
        else:
            merged[key] = value.to(own[key].dtype)
    for key in own:
        if key not in merged and key not in src:
            report.append(f"missing in checkpoint, kept ours: {key}")
    unet.load_state_dict({**own, **merged})
    report.insert(0, f"initialised {len(merged)}/{len(own)} tensors from {path}")
    return report


# ----------------------------------------------------------------------------- data
def _subset_split(split: Any, idx: np.ndarray) -> Any:
    """A PreparedSplit restricted to rows ``idx`` (arrays and lists indexed alike)."""
    if not dataclasses.is_dataclass(split):
        raise TrainError(f"cannot hold out images from a {type(split).__name__} (expected a PreparedSplit)")
    n = len(split.labels)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(split):
        value = getattr(split, f.name)
        if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == n:
            changes[f.name] = value[idx]
        elif isinstance(value, list) and len(value) == n:
            changes[f.name] = [value[i] for i in idx]
    return dataclasses.replace(split, **changes)


def _epoch_loader(dataset: Any, cfg: DiffadConfig, seed: int, epoch: int) -> torch.utils.data.DataLoader:
    """The loader of one epoch: its shuffle order and worker seeds come only from (seed, epoch),
    so a resumed run reproduces the same batches."""
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    drop_last = len(dataset) >= cfg.train.batch_size
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, shuffle=True, generator=g, drop_last=drop_last,
        num_workers=cfg.train.num_workers, persistent_workers=False,
    )


def _batches(dataset: Any, cfg: DiffadConfig, seed: int, start_batch: int,
             restore: Callable[[], None] | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches from global batch index ``start_batch`` on; ``restore`` runs once after
    fast-forwarding (replaying) the skipped batches of the current epoch."""
    per_epoch = len(_epoch_loader(dataset, cfg, seed, 0))
    if per_epoch == 0:
        raise TrainError("the training set is empty")
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        it = iter(_epoch_loader(dataset, cfg, seed, epoch))
        for _ in range(skip):
            next(it)  # replay, so augmentation streams in worker processes match
        skip = 0
        if restore is not None:
            restore()
            restore = None
        yield from it
        epoch += 1


def _train_image_batches(splits: list[Any], batch_size: int) -> Iterator[torch.Tensor]:
    """The training images without augmentation, in fixed order (for PaDiM)."""
    for split in splits:
        images = split.images
        for i in range(0, len(images), batch_size):
            yield torch.as_tensor(np.asarray(images[i:i + batch_size], dtype=np.float32))


# ----------------------------------------------------------------------------- frozen nets
def _build_feature_target(cfg: DiffadConfig) -> nn.Module:
    """FeatureTarget built under a fixed seed (cfg.seed), so random-weight backbones (smoke,
    tests) are the same in training and in ``load_model``; the global RNG is left untouched."""
    from diffad_core.nets import FeatureTarget

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        target = FeatureTarget(cfg.features)
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval()


def _build_padim(cfg: DiffadConfig) -> nn.Module:
    """Padim built under a fixed seed (cfg.padim.seed); see ``_build_feature_target``."""
    from diffad_core.nets import Padim

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.padim.seed))
        return Padim(cfg.padim, cfg.data.image_size)


def _padim_statistics(padim: nn.Module) -> dict[str, torch.Tensor]:
    """PaDiM's fitted state without the backbone weights (rebuilt from the config on load)."""
    return {k: v for k, v in padim.state_dict().items() if not k.startswith("backbone.")}


# ----------------------------------------------------------------------------- EMA
@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model (improved-diffusion's update_ema)."""
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.mul_(rate).add_(p.detach(), alpha=1.0 - rate)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------- train
def _stored_result(out_dir: Path, meta: dict[str, Any]) -> TrainResult:
    return TrainResult(
        checkpoint_dir=out_dir, steps=int(meta["steps"]), seconds=float(meta["train_seconds"]),
        losses=[(int(s), float(v)) for s, v in meta.get("losses", [])],
        final_loss=float(meta["final_loss"]), init_report=list(meta.get("init_report", [])),
    )


def _finished(out_dir: Path, cfg: DiffadConfig) -> dict[str, Any] | None:
    """meta.json of a finished folder trained with this config, None if not finished."""
    if not all((out_dir / name).is_file() for name in FINAL_FILES):
        return None
    stored = json.loads((out_dir / "config.json").read_text())
    if _comparable(stored) != _comparable(cfg.to_dict()):
        raise TrainError(
            f"{out_dir} already holds a model trained with a different config; choose another "
            "output folder or delete it"
        )
    meta = json.loads((out_dir / "meta.json").read_text())
    return meta if meta.get("complete") else None


def train_model(
    cfg: DiffadConfig,
    categories: list[str],
    out_dir: Path,
    *,
    resume: bool = True,
    progress: bool = True,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train one model on ``categories`` (one: per-category; several: unified, class-conditional)
    and write the checkpoint folder ``out_dir``. See the module docstring.

    ``class_index`` is the sorted category list; with ``unet.class_cond`` each image's label is
    its category's index. Seeds: python/numpy/torch from ``cfg.seed`` plus a crc32 offset of the
    category list. Timesteps (uniform over the original chain) and noise come from a CPU
    generator, so the draws do not depend on the device. ``resume=True`` continues from
    ``train_state.pt`` exactly (bit-identical on CPU): the interrupted epoch's batches are
    replayed, then the RNG states are restored.
    """
    from tqdm.auto import tqdm

    from diffad_core.data import TrainImages, prepare_split
    from diffad_core.nets import build_unet

    out_dir = Path(out_dir)
    categories = list(categories)
    if not categories:
        raise TrainError("train_model needs at least one category")
    if len(set(categories)) != len(categories):
        raise TrainError(f"duplicate categories in {categories}")
    if cfg.mode == "per_category" and len(categories) != 1:
        raise TrainError(f"mode=per_category trains one category at a time, got {categories}; "
                         "use mode=unified for one model over several")
    class_index = {c: i for i, c in enumerate(sorted(categories))}
    if cfg.unet.class_cond and len(class_index) > cfg.unet.num_classes:
        raise TrainError(f"unet.num_classes={cfg.unet.num_classes} is smaller than the "
                         f"{len(class_index)} categories to train")
    for name in ("iterations", "batch_size", "checkpoint_every", "log_every"):
        if getattr(cfg.train, name) < 1:
            raise TrainError(f"train.{name} must be >= 1, got {getattr(cfg.train, name)}")
    if not 0.0 <= cfg.train.ema_rate < 1.0:
        raise TrainError(f"train.ema_rate must be in [0, 1), got {cfg.train.ema_rate}")

    if resume:
        meta = _finished(out_dir, cfg)
        if meta is not None:
            return _stored_result(out_dir, meta)

    device = select_device(cfg.runtime.device)
    if cfg.runtime.num_threads:
        torch.set_num_threads(int(cfg.runtime.num_threads))
    seed = _run_seed(cfg, categories)
    _seed_everything(seed)

    # Data: train/good of every category; hold out the Ours* validation images if asked.
    held_out: dict[str, list[int]] = {}
    splits = []
    for c in categories:
        split = prepare_split(cfg, c, "train")
        if cfg.score.alpha_per_category:
            train_idx, val_idx = split_train_validation(len(split.labels), cfg)
            split = _subset_split(split, train_idx)
            held_out[c] = [int(i) for i in val_idx]
        if len(split.labels) == 0:
            raise TrainError(f"category {c!r} has no training images")
        splits.append(split)
    dataset = TrainImages(splits, cfg.data.rotation_degrees, cfg.data.augment_rotation, class_index,
                          seed=seed)

    # Networks: the UNet is initialised from the run seed, so its init is reproducible.
    feature_target = _build_feature_target(cfg).to(device)
    feature_channels = int(feature_target.channels)
    _seed_everything(seed)
    unet = build_unet(cfg, feature_channels).to(device)
    init_report: list[str] = []
    state_path = out_dir / STATE_FILE
    state: dict[str, Any] | None = None
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("format") != _STATE_FORMAT or _comparable(state["config"]) != _comparable(cfg.to_dict()) \
                or state["categories"] != categories:
            raise TrainError(f"{state_path} belongs to a different config or category list; "
                             "train with resume=False (--no-resume) to start over")
    elif cfg.train.init_checkpoint:
        init_report = init_from_checkpoint(unet, cfg.train.init_checkpoint)
        for line in init_report:
            _log.info("init_checkpoint: %s", line)
    ema = copy.deepcopy(unet).eval()
    for p in ema.parameters():
        p.requires_grad_(False)

    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    total = int(cfg.train.iterations)
    # Linear anneal to 0 (improved-diffusion's _anneal_lr): lr_i = lr * (1 - i / total).
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda i: 1.0 - i / total) if cfg.train.lr_anneal else (lambda i: 1.0))
    dtype = amp_dtype(device, cfg.train.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    train_schedule, _ = diffusion_schedules(cfg.diffusion.steps, cfg.diffusion.beta_start,
                                            cfg.diffusion.beta_end, cfg.diffusion.respacing)
    # Timesteps and noise come from a CPU generator: the same draws on every device.
    draw = torch.Generator().manual_seed(seed + 1)
    step = 0
    losses: list[tuple[int, float]] = []
    elapsed = 0.0
    restore: Callable[[], None] | None = None
    if state is not None:
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        draw.set_state(state["draw_generator"])
        step = int(state["step"])
        losses = [(int(s), float(v)) for s, v in state["losses"]]
        elapsed = float(state["seconds"])
        init_report = list(state.get("init_report", []))
        rng = state["rng"]
        data_state = state["data"]

        def restore() -> None:
            # After replaying the skipped batches of the epoch: the RNG streams as they were.
            _set_rng_state(rng, device)
            dataset.generator.set_state(data_state["augment_generator"])

    def save_state() -> None:
        payload = {
            "format": _STATE_FORMAT, "config": cfg.to_dict(), "categories": categories, "step": step,
            "model": unet.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "lr_scheduler": lr_sched.state_dict(), "scaler": scaler.state_dict(),
            "draw_generator": draw.get_state(), "rng": _rng_state(device),
            "data": {"seed": seed, "next_batch": step, "augment_generator": dataset.generator.get_state()},
            "losses": losses,
            "seconds": elapsed + (time.perf_counter() - t_start), "init_report": init_report,
        }
        atomic_write(state_path, lambda p: torch.save(payload, p))

    def unet_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_context(device, cfg.train.amp):
            return unet(x, t, y)

    out_dir.mkdir(parents=True, exist_ok=True)
    # A stale model from an earlier run must not pass for this one (model.safetensors first:
    # it is the "finished" marker others check).
    stale = list(reversed(FINAL_FILES)) + ([STATE_FILE] if state is None else [])
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()
    t_start = time.perf_counter()
    window: dict[str, list[float]] = {k: [] for k in ("loss", "mse", "vb", "feature")}
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"train {'+'.join(categories)}",
               unit="it", dynamic_ncols=True)
    batches = _batches(dataset, cfg, seed, step, restore)
    unet.train()
    try:
        while step < total:
            x0, labels = next(batches)
            x0 = x0.to(device=device, dtype=torch.float32)
            y = labels.to(device=device, dtype=torch.long) if cfg.unet.class_cond else None
            # METHOD.md §2: timesteps uniform over the original chain.
            t = torch.randint(0, train_schedule.num_timesteps, (x0.shape[0],), generator=draw)
            noise = torch.randn(x0.shape, generator=draw).to(device)
            lr_now = opt.param_groups[0]["lr"]
            with torch.no_grad(), autocast_context(device, cfg.train.amp):
                target = feature_target(x0)
            terms = training_losses(train_schedule, unet_fn, x0, t.to(device), y, target, noise=noise,
                                    feature_weight=cfg.train.feature_loss_weight)
            loss = terms["loss"].mean()
            if not torch.isfinite(loss):
                raise TrainError(f"loss is not finite at step {step + 1} ({loss.item()}); "
                                 "lower train.lr or use train.amp=off")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            lr_sched.step()
            _ema_update(ema, unet, cfg.train.ema_rate)
            step += 1
            value = float(loss.item())
            losses.append((step, value))
            for k in window:
                window[k].append(float(terms[k].mean().item()))
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if step % cfg.train.checkpoint_every == 0 or step == total:
                save_state()
            if on_log is not None and (step % cfg.train.log_every == 0 or step == total):
                record = {k: float(np.mean(v)) for k, v in window.items() if v}
                record["lr"] = float(lr_now)
                window = {k: [] for k in window}
                on_log(step, record)
    finally:
        bar.close()
    seconds = elapsed + (time.perf_counter() - t_start)
    if step == 0 or not losses:
        raise TrainError("no training step was run")

    # PaDiM on the (non-held-out) training images, no augmentation (METHOD.md §4).
    padim = _build_padim(cfg).to(device)
    padim.fit(x.to(device) for x in _train_image_batches(splits, cfg.score.batch_size))

    final_loss = losses[-1][1]
    meta = {
        "complete": True, "categories": categories, "class_index": class_index, "steps": step,
        "feature_channels": feature_channels, "image_size": cfg.data.image_size,
        "versions": _versions(), "train_seconds": seconds, "final_loss": final_loss,
        "losses": losses, "init_report": init_report, "held_out": held_out, "seed": seed,
        "config_hash": cfg.config_hash(), "device": str(device),
        "amp": str(dtype).removeprefix("torch.") if dtype is not None else "fp32",
    }
    _save_safetensors(out_dir / "padim.safetensors", _padim_statistics(padim))
    _write_json(out_dir / "config.json", cfg.to_dict())
    _write_json(out_dir / "meta.json", meta)
    _save_safetensors(out_dir / "model.safetensors", ema.state_dict(),
                      metadata={"format": "pt", "what": "EMA UNet", "config_hash": cfg.config_hash()})
    return TrainResult(checkpoint_dir=out_dir, steps=step, seconds=seconds, losses=losses,
                       final_loss=final_loss, init_report=init_report)


# ----------------------------------------------------------------------------- load
def load_model(checkpoint_dir: str | Path, device: str | torch.device | None = None) -> DiffadModel:
    """Rebuild a trained model from its checkpoint folder (EMA UNet in eval mode) on ``device``
    (default: CUDA if available, else CPU). A missing file is a FileNotFoundError naming the
    folder and the file."""
    from safetensors.torch import load_file

    from diffad_core.nets import build_unet

    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    for name in FINAL_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint folder {folder} has no {name} (an unfinished or "
                                    "partial training?)")
    try:
        cfg = config_from_dict(json.loads((folder / "config.json").read_text()))
        meta = json.loads((folder / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint folder {folder}: unreadable JSON: {exc}") from exc
    # None: "auto" here, not the training machine's runtime.device (a model loads anywhere).
    dev = select_device(device if device is not None else "auto")
    feature_target = _build_feature_target(cfg).to(dev)
    channels = int(meta.get("feature_channels", feature_target.channels))
    if channels != int(feature_target.channels):
        raise ValueError(f"checkpoint folder {folder}: meta.json says {channels} feature channels, "
                         f"the configured feature target gives {feature_target.channels}")
    unet = build_unet(cfg, channels)
    try:
        unet.load_state_dict(load_file(str(folder / "model.safetensors")))
    except RuntimeError as exc:
        raise ValueError(f"checkpoint folder {folder}: model.safetensors does not match the config: {exc}") from exc
    unet = unet.to(dev).eval()
    padim = _build_padim(cfg)
    missing, unexpected = padim.load_state_dict(load_file(str(folder / "padim.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint folder {folder}: padim.safetensors does not match the config "
                         f"(missing {missing}, unexpected {unexpected})")
    padim = padim.to(dev).eval()
    _, schedule = diffusion_schedules(cfg.diffusion.steps, cfg.diffusion.beta_start,
                                      cfg.diffusion.beta_end, cfg.diffusion.respacing)
    class_index = {str(k): int(v) for k, v in meta.get("class_index", {}).items()}
    return DiffadModel(cfg=cfg, unet=unet, feature_target=feature_target, padim=padim,
                       schedule=schedule, class_index=class_index, device=dev, meta=meta)
