"""Gradient denoising reconstruction (METHOD.md §4, Algorithm 1 of the paper).

Anomalies are treated as noise: a few gradient steps on a PaDiM anomaly score push the image
towards normality while adding the equivalent of forward-diffusion noise, and one reverse step
of the diffusion model removes that noise. Repeated for ``rounds`` rounds. Batched over images;
the UNet runs under no_grad, PaDiM with gradients w.r.t. the image only (weights frozen).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from diffad_core.config import ReconstructConfig
from diffad_core.data import PreparedSplit
from diffad_core.diffusion import model_timesteps, reverse_step
from diffad_core.model import DiffadModel
from diffad_core.progress import progress_bar
from diffad_core.runtime import autocast_context, in_chunks, micro_batch


def _padim_gradient(model: DiffadModel, x: torch.Tensor) -> torch.Tensor:
    """g = -grad_x mean(PaDiM map(x)), normalised by its std per image; the closed-form
    Mahalanobis gradient (``Padim.mean_score_gradient``)."""
    g = -model.padim.mean_score_gradient(x)
    std = g.flatten(1).std(dim=1).clamp_min(1e-12)
    return g / std.view(-1, 1, 1, 1)


def gradient_denoise(
    model: DiffadModel,
    images: torch.Tensor,
    cfg: ReconstructConfig,
    generator: torch.Generator | None = None,
    *,
    category: str | None = None,
) -> torch.Tensor:
    """Algorithm 1: turn anomalous images (B, 3, H, W) in [-1, 1] into normal-looking ones.

    ``generator`` (CPU) seeds the reverse-step noise when ``cfg.sample`` is true. ``category``
    picks the class label for a class-conditional UNet (default: the model's only category).
    Returns a (B, 3, H, W) float32 tensor on CPU, clamped to [-1, 1].
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if not 0.0 < cfg.step_size < 1.0:
        raise ValueError(f"reconstruct.step_size must be in (0, 1), got {cfg.step_size}")
    n_chain = len(model.schedule.timestep_map)
    if not 0 <= cfg.denoise_t < n_chain:
        raise ValueError(
            f"reconstruct.denoise_t={cfg.denoise_t} is outside the respaced chain (0..{n_chain - 1})"
        )
    device = model.device
    s = float(cfg.step_size)
    omega = math.sqrt(1.0 - s * s)
    b = images.shape[0]
    t_idx = torch.full((b,), int(cfg.denoise_t), dtype=torch.long, device=device)
    t_model = model_timesteps(model.schedule, t_idx)
    if category is None:
        if len(model.class_index) > 1:
            raise ValueError("gradient_denoise needs a category for a multi-class model")
        category = next(iter(model.class_index), "")
    y = model.class_labels(category, b)
    if generator is not None and cfg.sample and generator.device != device:
        # reverse_step draws its noise on the images' device: seed a generator there from ours.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        generator = torch.Generator(device=device).manual_seed(seed)
    # Rows are independent: on a CPU the UNet runs a few images at a time (cache-sized).
    chunk = micro_batch(device, *images.shape[-2:])
    # Algorithm 1, line 1: start from the test image itself.
    x = images.to(device=device, dtype=torch.float32)
    for _ in range(int(cfg.rounds)):  # Algorithm 1, line 2
        for _ in range(int(cfg.grad_steps)):  # Algorithm 1, line 3
            # Algorithm 1, line 4: g = -grad_x mean(PaDiM map(x)) / std.
            g = _padim_gradient(model, x)
            # Algorithm 1, line 5: x = omega x + s g, a forward step of variance s^2.
            x = omega * x + s * g
        # Algorithm 1, line 7: one reverse step of the diffusion model at respaced index t.
        with torch.no_grad(), autocast_context(device, model.cfg.train.amp):
            model_out, _ = in_chunks(model.unet, [x, t_model, y], chunk)
        with torch.no_grad():
            x = reverse_step(model.schedule, model_out.float(), x, t_idx,
                             sample=bool(cfg.sample), generator=generator)
    # Algorithm 1, line 9: return the reconstruction, clamped to the image range.
    return x.clamp(-1.0, 1.0).float().cpu()


def reconstruction_order(labels: Sequence[int], defect_types: Sequence[str]) -> list[int]:
    """Test-image indices in the order to reconstruct them: anomalous images first (they are
    what Algorithm 1 is for), one defect type after another (the first of each type, then the
    second, ...), then the normal ones; so a limited budget covers every defect type."""
    seen: dict[str, int] = {}
    rank = []
    for kind in defect_types:
        rank.append(seen.get(kind, 0))
        seen[kind] = rank[-1] + 1
    return sorted(range(len(rank)), key=lambda i: (-int(labels[i]), rank[i], i))


def reconstruct_split(
    model: DiffadModel, prepared: PreparedSplit, settings: ReconstructConfig, *,
    limit: int | None = None, seed: int = 0, progress: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Algorithm 1 over a prepared split, in :func:`reconstruction_order`, at most ``limit``
    images, ``settings.batch_size`` at a time; yields (index into the split,
    reconstruction (3, H, W) in [-1, 1] on the CPU)."""
    order = reconstruction_order(prepared.labels, prepared.defect_types)
    if limit is not None:
        order = order[: max(0, int(limit))]
    generator = torch.Generator().manual_seed(int(seed))
    bs = max(1, int(settings.batch_size))
    with progress_bar(total=len(order), desc=f"reconstruct {prepared.category}", unit="img",
                      enabled=progress) as bar:
        for lo in range(0, len(order), bs):
            idx = order[lo : lo + bs]
            batch = torch.from_numpy(np.ascontiguousarray(prepared.images[idx]))
            recon = gradient_denoise(model, batch, settings, generator, category=prepared.category)
            yield from zip(idx, recon.cpu())
            bar.update(len(idx))
