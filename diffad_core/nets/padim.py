"""PaDiM (Defard et al.), the anomaly score used as the loss of gradient denoising (METHOD.md §4).

Backbone layers ``out_indices`` (wide_resnet50_2 layers 1-3 in the paper) are upsampled
bilinearly to the first chosen layer's grid (64x64 for 256 px) and concatenated; ``n_channels``
of them are kept at random (fixed seed). A Gaussian N(mu_p, Sigma_p + eps I) is fitted per grid
position p on the training images, and the score is the Mahalanobis distance
``sqrt((f_p - mu_p)^T Sigma_p^-1 (f_p - mu_p))``, differentiable w.r.t. the input image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from diffad_core.config import PadimConfig
from diffad_core.nets.backbones import load_backbone, normalisation_stats
from diffad_core.nets.features import resize_concat

__all__ = ["Padim"]

_STAT_BUFFERS = ("mean", "inv_cov")
_INV_CHUNK = 512  # grid positions per batched matrix inverse


class Padim(nn.Module):
    """PaDiM with a frozen timm backbone; ``fit`` then ``score_map``.

    Buffers (all in ``state_dict``): ``channel_index`` (n_channels,), ``mean`` (P, d),
    ``inv_cov`` (P, d, d) with P = h * w grid positions, ``n_fit`` (number of images fitted).
    Before ``fit`` (or loading a fitted state) ``mean``/``inv_cov`` are empty.
    """

    def __init__(self, cfg: PadimConfig, image_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        self.backbone = load_backbone(cfg.weights, cfg.out_indices)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        channels = [int(c) for c in self.backbone.feature_info.channels()]
        reduction = int(self.backbone.feature_info.reduction()[0])
        total = sum(channels)
        if not 1 <= cfg.n_channels <= total:
            raise ValueError(
                f"padim.n_channels={cfg.n_channels} must be in [1, {total}] (the channels of "
                f"{cfg.weights.timm_name} layers {list(cfg.out_indices)}: {channels})"
            )
        if cfg.eps <= 0:
            raise ValueError(f"padim.eps must be > 0, got {cfg.eps}")
        side = math.ceil(image_size / reduction)
        self.grid = (side, side)
        gen = torch.Generator().manual_seed(cfg.seed)
        index = torch.randperm(total, generator=gen)[: cfg.n_channels].sort().values
        self.register_buffer("channel_index", index)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inv_cov", torch.empty(0))
        self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))
        norm_mean, norm_std = normalisation_stats(self.backbone)
        self.register_buffer("norm_mean", torch.tensor(norm_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.tensor(norm_std).view(1, 3, 1, 1), persistent=False)
        super().train(False)

    @property
    def n_channels(self) -> int:
        return int(self.channel_index.numel())

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    def train(self, mode: bool = True) -> Padim:
        """Stay in eval mode (the backbone's BatchNorm statistics are fixed)."""
        return super().train(False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, d, P) selected, upsampled features (keeps grads)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Padim: expected x of shape (B, 3, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"Padim: built for {self.image_size}x{self.image_size} images, got "
                f"{x.shape[-2]}x{x.shape[-1]}"
            )
        inp = ((x + 1) / 2 - self.norm_mean.to(x.dtype)) / self.norm_std.to(x.dtype)
        feats = list(self.backbone(inp))
        if tuple(feats[0].shape[-2:]) != self.grid:
            raise RuntimeError(
                f"Padim: first layer grid is {tuple(feats[0].shape[-2:])}, expected {self.grid}"
            )
        # Keep the selected channels of each layer before resizing: bilinear resizing is per
        # channel, so this equals resize-then-select, on n_channels instead of all channels.
        selected, start = [], 0
        for f in feats:
            stop = start + f.shape[1]
            inside = self.channel_index[(self.channel_index >= start) & (self.channel_index < stop)]
            if inside.numel():
                selected.append(f.index_select(1, inside - start))
            start = stop
        return resize_concat(selected, self.grid).flatten(2)

    @torch.no_grad()
    def fit(self, batches: Iterable[Any]) -> Padim:
        """Fit the per-position Gaussians from batches of training images (B, 3, H, W) in [-1, 1].

        A batch may also be a tuple/list whose first item is the image tensor. Sums and sums of
        outer products are accumulated in float64 (shifted by the first batch's mean for
        stability), so memory does not grow with the number of images.
        """
        device = self.channel_index.device
        n = 0
        shift: torch.Tensor | None = None
        s1: torch.Tensor | None = None
        s2: torch.Tensor | None = None
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(images, torch.Tensor):
                raise TypeError(f"Padim.fit: expected image tensors, got {type(images).__name__}")
            emb = self.embed(images.to(device=device, dtype=torch.float32))
            e = emb.permute(2, 0, 1).double()  # (P, B, d)
            if shift is None:
                shift = e.mean(dim=1)
                s1 = torch.zeros_like(shift)
                s2 = torch.zeros(*shift.shape, shift.shape[-1], dtype=torch.float64, device=device)
            assert s1 is not None and s2 is not None
            c = e - shift[:, None, :]
            s1 += c.sum(dim=1)
            s2 += c.transpose(1, 2) @ c
            n += e.shape[1]
        if n < 2 or shift is None or s1 is None or s2 is None:
            raise ValueError(f"Padim.fit needs at least 2 images, got {n}")
        m = s1 / n
        # unbiased covariance (as np.cov) + eps I, METHOD.md §4; built in place in s2 and
        # inverted in chunks of positions to bound peak memory (P x d x d is 8 GB at paper size).
        s2 -= n * m[:, :, None] * m[:, None, :]
        s2 /= n - 1
        s2 += self.cfg.eps * torch.eye(s2.shape[-1], dtype=s2.dtype, device=device)
        inv_cov = torch.empty(s2.shape, dtype=torch.float32, device=device)
        for start in range(0, s2.shape[0], _INV_CHUNK):
            inv = torch.linalg.inv(s2[start:start + _INV_CHUNK])
            inv_cov[start:start + _INV_CHUNK] = (inv + inv.transpose(1, 2)) / 2  # exactly symmetric
        self.mean = (shift + m).float()
        self.inv_cov = inv_cov
        self.n_fit = torch.tensor(n, dtype=torch.long, device=device)
        return self

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance per grid position, (B, h, w); differentiable w.r.t. ``x``."""
        if not self.fitted:
            raise RuntimeError("Padim.score_map called before fit() or loading a fitted state_dict")
        emb = self.embed(x)  # (B, d, P)
        diff = emb.permute(2, 0, 1) - self.mean[:, None, :].to(emb.dtype)  # (P, B, d)
        q = ((diff @ self.inv_cov.to(emb.dtype)) * diff).sum(-1)  # (P, B)
        dist = q.clamp_min(1e-12).sqrt()
        return dist.transpose(0, 1).reshape(x.shape[0], *self.grid)

    def mean_score_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``grad_x`` of each image's mean Mahalanobis distance, (B, 3, H, W); the gradient of
        ``score_map(x).flatten(1).mean(1).sum()`` without building autograd graphs for the
        distance: ``d sqrt(q_p) / d f_p = Sigma_p^-1 (f_p - mu_p) / sqrt(q_p)`` (inv_cov is
        exactly symmetric), so ``Sigma^-1 (f - mu)`` is computed once, without gradients, and
        only the backbone is backpropagated (Algorithm 1 line 4, METHOD.md §4)."""
        if not self.fitted:
            raise RuntimeError("Padim.mean_score_gradient called before fit() or loading a fitted state_dict")
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            emb = self.embed(xg)  # (B, d, P)
            with torch.no_grad():
                diff = emb.detach().float().permute(2, 0, 1) - self.mean[:, None, :]  # (P, B, d)
                u = torch.bmm(diff, self.inv_cov)  # Sigma^-1 (f - mu), (P, B, d)
                q = (u * diff).sum(-1, keepdim=True)  # (P, B, 1)
                # d/df of the mean over P of sqrt(max(q, 1e-12)); zero where the clamp holds
                scale = torch.where(q > 1e-12, q.clamp_min(1e-12).rsqrt(), 0.0) / diff.shape[0]
                grad_emb = (u * scale).permute(1, 2, 0).to(emb.dtype)  # (B, d, P)
            (grad,) = torch.autograd.grad(emb, xg, grad_outputs=grad_emb)
        return grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_map(x)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # mean/inv_cov are empty until fitted: take the saved shapes before copying.
        saved_mean = state_dict.get(prefix + "mean")
        saved_index = state_dict.get(prefix + "channel_index")
        if isinstance(saved_mean, torch.Tensor) and saved_mean.numel() > 0:
            d = int(saved_index.numel()) if isinstance(saved_index, torch.Tensor) else self.n_channels
            expected = (self.grid[0] * self.grid[1], d)
            if tuple(saved_mean.shape) != expected:
                raise ValueError(
                    f"Padim state_dict: mean has shape {tuple(saved_mean.shape)}, expected "
                    f"{expected} for {self.image_size}px images and {d} channels"
                )
        for name in _STAT_BUFFERS:
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor):
                current = getattr(self, name)
                setattr(self, name, torch.empty(saved.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]
