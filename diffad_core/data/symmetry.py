"""Flips and quarter turns of the square under which a category's training images look the same
(ours, issue #8; bench/tune_cpu_dihedral_rule.md, docs/method.md "Flips and quarter turns").

Many textures look the same flipped or turned by a quarter turn; objects and oriented textures
(bricks in horizontal rows) do not. ``allowed_transforms`` tests each of the seven non-identity
transforms of the square on the training images themselves, and training
(``data.augment_dihedral = "auto"``) then shows each image as it is or under one allowed
transform, with equal probability. The test, fixed before it was run on any image:

1. **mean image:** the per-pixel z of ``m - g(m)`` (``m`` the mean image, its standard error from
   the per-pixel variances of both places) has a root mean square over the pixels of at most
   ``_Z_LIMIT`` (about 1 when the images' distribution is invariant under g), and at most
   ``_OUTLIER_SHARE`` of the pixels have ``|z| > _OUTLIER_Z`` (a small object on a plain
   background moves few pixels; the rule's amendment);
2. **edge orientation:** each image's anisotropy ``a = (E gx^2 - E gy^2) / (E gx^2 + E gy^2)`` and
   skew ``b = 2 E gx gy / (E gx^2 + E gy^2)`` (central differences); g flips the sign of a, of
   b, of both or of neither (``_SIGN_CHANGES``), and each sign it flips must have its mean over
   the images within ``_Z_LIMIT`` standard errors of 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# The seven non-identity transforms of the square, acting on the last two axes (rows, columns).
DIHEDRAL: tuple[str, ...] = ("rot90", "rot180", "rot270", "flip_h", "flip_v", "transpose", "antitranspose")
# Which of (anisotropy a, skew b) each transform turns into its negative.
_SIGN_CHANGES: dict[str, tuple[bool, bool]] = {
    "rot90": (True, True), "rot180": (False, False), "rot270": (True, True),
    "flip_h": (False, True), "flip_v": (False, True), "transpose": (True, False),
    "antitranspose": (True, False),
}
_Z_LIMIT = 2.0
_OUTLIER_Z, _OUTLIER_SHARE = 4.0, 0.01
_MIN_STD_ERROR = 1e-6


def dihedral(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` (..., S, S) under the transform ``name`` of :data:`DIHEDRAL`."""
    if name == "rot90":
        return torch.rot90(x, 1, dims=(-2, -1))
    if name == "rot180":
        return torch.rot90(x, 2, dims=(-2, -1))
    if name == "rot270":
        return torch.rot90(x, 3, dims=(-2, -1))
    if name == "flip_h":
        return x.flip(-1)
    if name == "flip_v":
        return x.flip(-2)
    if name == "transpose":
        return x.transpose(-2, -1)
    if name == "antitranspose":
        return x.transpose(-2, -1).flip(-2, -1)
    raise ValueError(f"unknown transform {name!r}; known: {list(DIHEDRAL)}")


def _orientation(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's edge anisotropy and skew (N,), from (N, S, S) grey images."""
    gy, gx = np.gradient(grey, axis=(1, 2))
    exx, eyy, exy = (gx * gx).mean(axis=(1, 2)), (gy * gy).mean(axis=(1, 2)), (gx * gy).mean(axis=(1, 2))
    total = np.maximum(exx + eyy, 1e-12)
    return (exx - eyy) / total, 2.0 * exy / total


def _near_zero(values: np.ndarray) -> bool:
    """The mean of ``values`` within ``_Z_LIMIT`` standard errors of 0."""
    std_error = max(float(values.std(ddof=1)) / math.sqrt(len(values)), _MIN_STD_ERROR)
    return abs(float(values.mean())) <= _Z_LIMIT * std_error


def allowed_transforms(images: np.ndarray) -> tuple[str, ...]:
    """The transforms of :data:`DIHEDRAL` the square images (N, C, S, S) look the same under, by
    the module's test; none for fewer than two images or non-square ones."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] != images.shape[-2] or len(images) < 2:
        return ()
    grey = images.mean(axis=1)
    n = len(grey)
    mean, var = torch.from_numpy(grey.mean(axis=0)), torch.from_numpy(grey.var(axis=0, ddof=1))
    a, b = _orientation(grey)
    a_ok, b_ok = _near_zero(a), _near_zero(b)
    allowed = []
    for name in DIHEDRAL:
        std_error = ((var + dihedral(var, name)) / n).sqrt().clamp_min(_MIN_STD_ERROR)
        z = (mean - dihedral(mean, name)) / std_error
        if float(z.pow(2).mean().sqrt()) > _Z_LIMIT or float((z.abs() > _OUTLIER_Z).double().mean()) > _OUTLIER_SHARE:
            continue
        flips_a, flips_b = _SIGN_CHANGES[name]
        if (flips_a and not a_ok) or (flips_b and not b_ok):
            continue
        allowed.append(name)
    return tuple(allowed)


__all__ = ["DIHEDRAL", "allowed_transforms", "dihedral"]
