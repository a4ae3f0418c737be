"""Training a diffad model (METHOD.md §2): the hybrid loss, AdamW, EMA, exact resume.

``train_model`` trains the ADM UNet with the hybrid loss (eps MSE + variance-only VB term +
feature loss), AdamW with a linear learning-rate anneal to 0 (``LinearLR``), an EMA of the
weights (timm's ``ModelEmaV3``), autocast on CUDA, periodic atomic checkpoints with exact resume,
then fits PaDiM on the training images and writes the checkpoint folder of ``model.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils.model_ema import ModelEmaV3

from diffad_core._atomic import atomic_write
from diffad_core.config import DiffadConfig, config_from_dict
from diffad_core.data import PreparedSplit, TrainImages, allowed_transforms, prepare_split, split_train_validation
from diffad_core.diffusion import training_losses
from diffad_core.model import (
    FINAL_FILES,
    build_feature_target,
    build_padim,
    diffusion_schedule,
    finished_meta,
    save_model,
    stored_config,
    versions,
)
from diffad_core.nets import build_unet
from diffad_core.nets.adm_init import load_adm_init
from diffad_core.progress import progress_bar
from diffad_core.runtime import (
    amp_dtype,
    autocast_context,
    rng_state,
    seed_everything,
    select_device,
    set_rng_state,
    set_threads,
)

STATE_FILE = "train_state.pt"
_STATE_FORMAT = 2
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


def holds_out_normals(cfg: DiffadConfig) -> bool:
    """Whether training leaves some train/good images out: the held-out normals that calibrate
    the maps and choose alpha ("Ours*"; METHOD.md §3)."""
    return bool(cfg.score.alpha_per_category or cfg.score.calibrate_maps)


def _run_seed(cfg: DiffadConfig, categories: list[str]) -> int:
    """cfg.seed plus a stable (crc32) offset per category set."""
    return int(cfg.seed) + zlib.crc32("|".join(sorted(categories)).encode()) % 1_000_003


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config that define the trained model (DiffadConfig.model_definition)."""
    return config_from_dict(cfg_dict).model_definition()


# ----------------------------------------------------------------------------- data
def _epoch_loader(dataset: Any, cfg: DiffadConfig, seed: int, epoch: int) -> torch.utils.data.DataLoader:
    """The loader of one epoch: its shuffle order and worker seeds come only from (seed, epoch),
    so a resumed run reproduces the same batches. On CUDA batches come in pinned memory, so the
    copy to the GPU overlaps the step before it (``non_blocking``; issue #11)."""
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    drop_last = len(dataset) >= cfg.train.batch_size
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, shuffle=True, generator=g, drop_last=drop_last,
        num_workers=cfg.train.num_workers, persistent_workers=False,
        pin_memory=select_device(cfg.runtime.device).type == "cuda",
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


def _train_image_batches(splits: list[PreparedSplit], batch_size: int) -> Iterator[torch.Tensor]:
    """The training images without augmentation, in fixed order (for PaDiM)."""
    for split in splits:
        images = split.images
        for i in range(0, len(images), batch_size):
            yield torch.as_tensor(np.asarray(images[i:i + batch_size], dtype=np.float32))


# ----------------------------------------------------------------------------- train
def _stored_result(out_dir: Path, meta: dict[str, Any]) -> TrainResult:
    return TrainResult(
        checkpoint_dir=out_dir, steps=int(meta["steps"]), seconds=float(meta["train_seconds"]),
        losses=[(int(s), float(v)) for s, v in meta.get("losses", [])],
        final_loss=float(meta["final_loss"]), init_report=list(meta.get("init_report", [])),
    )


def _finished(out_dir: Path, cfg: DiffadConfig) -> dict[str, Any] | None:
    """meta.json of a finished folder trained with this config, None if not finished."""
    meta = finished_meta(out_dir)
    if meta is None:
        return None
    if stored_config(out_dir).model_definition() != cfg.model_definition():
        raise TrainError(
            f"{out_dir} already holds a model trained with a different config; choose another "
            "output folder or delete it"
        )
    return meta


def _check(cfg: DiffadConfig, categories: list[str]) -> None:
    if not categories:
        raise TrainError("train_model needs at least one category")
    if len(set(categories)) != len(categories):
        raise TrainError(f"duplicate categories in {categories}")
    if cfg.mode == "per_category" and len(categories) != 1:
        raise TrainError(f"mode=per_category trains one category at a time, got {categories}; "
                         "use mode=unified for one model over several")
    if cfg.unet.class_cond and len(categories) > cfg.unet.num_classes:
        raise TrainError(f"unet.num_classes={cfg.unet.num_classes} is smaller than the "
                         f"{len(categories)} categories to train")
    for name in ("iterations", "batch_size", "checkpoint_every", "log_every"):
        if getattr(cfg.train, name) < 1:
            raise TrainError(f"train.{name} must be >= 1, got {getattr(cfg.train, name)}")
    if not 0.0 <= cfg.train.ema_rate < 1.0:
        raise TrainError(f"train.ema_rate must be in [0, 1), got {cfg.train.ema_rate}")


def _training_splits(cfg: DiffadConfig, categories: list[str]) -> tuple[list[PreparedSplit], dict[str, list[int]]]:
    """train/good of every category, without the held-out normals when the config keeps some."""
    held_out: dict[str, list[int]] = {}
    splits = []
    for c in categories:
        split = prepare_split(cfg, c, "train")
        if holds_out_normals(cfg):
            train_idx, val_idx = split_train_validation(len(split.labels), cfg.score.validation_fraction,
                                                        cfg.seed)
            split = split.subset(train_idx)
            held_out[c] = [int(i) for i in val_idx]
        if len(split.labels) == 0:
            raise TrainError(f"category {c!r} has no training images")
        splits.append(split)
    return splits, held_out


def train_model(
    cfg: DiffadConfig,
    categories: list[str],
    out_dir: Path,
    *,
    resume: bool = True,
    progress: bool = True,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    init_weights: Path | None = None,
) -> TrainResult:
    """Train one model on ``categories`` (one: per-category; several: unified, class-conditional)
    and write the checkpoint folder ``out_dir`` (``model.py``).

    ``class_index`` is the sorted category list; with ``unet.class_cond`` each image's label is
    its category's index. Seeds: python/numpy/torch from ``cfg.seed`` plus a crc32 offset of the
    category list. Timesteps (uniform over the original chain) and noise come from a CPU
    generator, so the draws do not depend on the device. ``resume=True`` continues from
    ``train_state.pt`` exactly (bit-identical on CPU): the interrupted epoch's batches are
    replayed, then the RNG states are restored. ``init_weights``: the ADM checkpoint file to
    fine-tune from (``train.init_checkpoint``, fetched by ``nets.adm_init.prepare_init_checkpoint``);
    None trains from scratch.
    """
    out_dir = Path(out_dir)
    categories = list(categories)
    _check(cfg, categories)
    class_index = {c: i for i, c in enumerate(sorted(categories))}
    if resume:
        meta = _finished(out_dir, cfg)
        if meta is not None:
            return _stored_result(out_dir, meta)

    device = select_device(cfg.runtime.device)
    set_threads(cfg.runtime.num_threads)
    seed = _run_seed(cfg, categories)
    seed_everything(seed)
    splits, held_out = _training_splits(cfg, categories)
    # Flips and quarter turns each category's own training images allow (data.augment_dihedral).
    transforms = {s.category: allowed_transforms(s.images) if cfg.data.augment_dihedral == "auto" else ()
                  for s in splits}
    if cfg.data.augment_dihedral == "auto":
        for category, names in transforms.items():
            _log.info("%s: flips and quarter turns allowed by its training images: %s",
                      category, ", ".join(names) or "none")
    dataset = TrainImages(splits, cfg.data.rotation_degrees, cfg.data.augment_rotation, class_index,
                          seed=seed, crop=cfg.data.train_crop, transforms=[transforms[s.category] for s in splits])

    # Networks: the UNet is initialised from the run seed, so its init is reproducible.
    feature_target = build_feature_target(cfg).to(device)
    feature_channels = int(feature_target.channels)
    seed_everything(seed)
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
    elif init_weights is not None:
        # Fine-tune from OpenAI's ImageNet ADM (METHOD.md §2): all or nothing, before the EMA
        # copy, so the EMA starts from the loaded weights as in the official run.
        report = load_adm_init(unet, init_weights,
                               num_classes=cfg.unet.num_classes if cfg.unet.class_cond else None)
        init_report = report.lines + ["", report.table_markdown()]
        for line in report.lines:
            _log.info("init_checkpoint: %s", line)
    # EMA of the weights (METHOD.md §2), evaluated and saved instead of the raw weights.
    ema = ModelEmaV3(unet, decay=cfg.train.ema_rate, exclude_buffers=True)

    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    total = int(cfg.train.iterations)
    # Linear anneal to 0 (improved-diffusion's _anneal_lr): lr_i = lr * (1 - i / total).
    lr_sched = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=1.0, end_factor=0.0 if cfg.train.lr_anneal else 1.0, total_iters=total)
    dtype = amp_dtype(device, cfg.train.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    train_schedule, scoring_schedule = diffusion_schedule(cfg)
    cap = cfg.train.max_timestep
    t_end = train_schedule.num_timesteps if cap is None else cap + 1
    scored_steps = scoring_schedule.timestep_map[cfg.diffusion.score_timesteps]  # Eq. 11's, original chain
    # Timesteps and noise come from a CPU generator: the same draws on every device.
    draw = torch.Generator().manual_seed(seed + 1)
    step = 0
    losses: list[tuple[int, float]] = []
    elapsed = 0.0
    restore: Callable[[], None] | None = None
    if state is not None:
        unet.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
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
            set_rng_state(rng, device)
            dataset.generator.set_state(data_state["augment_generator"])

    def save_state() -> None:
        payload = {
            "format": _STATE_FORMAT, "config": cfg.to_dict(), "categories": categories, "step": step,
            "model": unet.state_dict(), "ema": ema.module.state_dict(), "optimizer": opt.state_dict(),
            "lr_scheduler": lr_sched.state_dict(), "scaler": scaler.state_dict(),
            "draw_generator": draw.get_state(), "rng": rng_state(device),
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
    bar = progress_bar(total=total, initial=step, enabled=progress, desc=f"train {'+'.join(categories)}",
                       unit="it")
    batches = _batches(dataset, cfg, seed, step, restore)
    unet.train()
    try:
        while step < total:
            x0, target_input, labels = next(batches)
            x0 = x0.to(device=device, dtype=torch.float32, non_blocking=True)
            y = labels.to(device=device, dtype=torch.long, non_blocking=True) if cfg.unet.class_cond else None
            # METHOD.md §2: timesteps uniform over the original chain (up to train.max_timestep);
            # with train.scored_step_fraction, that share at Eq. 11's steps instead (ours).
            t = torch.randint(0, t_end, (x0.shape[0],), generator=draw)
            if cfg.train.scored_step_fraction > 0:
                at_scored = torch.rand(t.shape, generator=draw) < cfg.train.scored_step_fraction
                which = torch.randint(0, len(scored_steps), t.shape, generator=draw)
                t = torch.where(at_scored, scored_steps[which], t)
            noise = torch.randn(x0.shape, generator=draw).to(device, non_blocking=True)
            lr_now = opt.param_groups[0]["lr"]
            # F(x0) on the grid of the head's level (H/4, the paper), from x0 itself or from it
            # at features.image_size.
            target_input = (x0 if cfg.feature_image_size is None
                            else target_input.to(device=device, dtype=torch.float32, non_blocking=True))
            with torch.no_grad(), autocast_context(device, cfg.train.amp):
                target = feature_target(target_input, size=x0.shape[-1] // cfg.unet.feature_stride)
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
            ema.update(unet)
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
    padim = build_padim(cfg).to(device)
    padim.fit(x.to(device) for x in _train_image_batches(splits, cfg.score.batch_size))
    meta = {
        "complete": True, "categories": categories, "class_index": class_index, "steps": step,
        "feature_channels": feature_channels, "image_size": cfg.data.image_size,
        "versions": versions(), "train_seconds": seconds, "final_loss": losses[-1][1],
        "losses": losses, "init_report": init_report, "held_out": held_out, "seed": seed,
        "config_hash": cfg.config_hash(), "device": str(device),
        "amp": str(dtype).removeprefix("torch.") if dtype is not None else "fp32",
        "dihedral_transforms": {c: list(names) for c, names in transforms.items()},
    }
    save_model(out_dir, cfg, ema.module, padim, meta)
    return TrainResult(checkpoint_dir=out_dir, steps=step, seconds=seconds, losses=losses,
                       final_loss=losses[-1][1], init_report=init_report)
