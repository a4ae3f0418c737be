"""Flips and quarter turns allowed by a category's own training images (data/symmetry.py,
bench/tune_cpu_dihedral_rule.md): the transforms, the sign table, the test on textures and
objects, and their use in TrainImages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffad_core.data import DIHEDRAL, PreparedSplit, TrainImages, allowed_transforms, dihedral
from diffad_core.data.symmetry import _SIGN_CHANGES, _orientation

# numpy's own spelling of each transform of the square, on (rows, cols).
_NUMPY = {"rot90": lambda a: np.rot90(a, 1), "rot180": lambda a: np.rot90(a, 2),
          "rot270": lambda a: np.rot90(a, 3), "flip_h": np.fliplr, "flip_v": np.flipud,
          "transpose": lambda a: a.T, "antitranspose": lambda a: np.rot90(a, 2).T}


def test_each_transform_is_numpys_and_they_are_seven_distinct_ones() -> None:
    square = np.arange(16.0).reshape(4, 4)
    outs = []
    for name in DIHEDRAL:
        out = dihedral(torch.from_numpy(square)[None, None], name)[0, 0].numpy()
        np.testing.assert_array_equal(out, _NUMPY[name](square), err_msg=name)
        outs.append(out.tobytes())
    assert len(set(outs) | {square.tobytes()}) == 8  # with the identity: the whole group
    with pytest.raises(ValueError, match="unknown transform 'shear'"):
        dihedral(torch.zeros(2, 2), "shear")


def test_sign_table_matches_measured_edge_orientation() -> None:
    # Diagonal-ish stripes: both the anisotropy a and the skew b are far from 0.
    yy, xx = np.mgrid[0:48, 0:48].astype(np.float64)
    stripes = np.sin(0.5 * xx + 0.2 * yy)[None]
    a, b = (float(v[0]) for v in _orientation(stripes))
    assert abs(a) > 0.3 and abs(b) > 0.3
    for name in DIHEDRAL:
        moved = dihedral(torch.from_numpy(stripes.copy()), name).numpy()
        a2, b2 = (float(v[0]) for v in _orientation(moved))
        flips_a, flips_b = _SIGN_CHANGES[name]
        assert a2 == pytest.approx(-a if flips_a else a, abs=1e-9), name
        assert b2 == pytest.approx(-b if flips_b else b, abs=1e-9), name


def _texture(n: int, seed: int, oriented: bool = False) -> np.ndarray:
    """Grey images (n * |orbit|, 3, 32, 32) of a smooth random texture, each drawn with every
    transform it is meant to allow, as a texture photographed in every such pose (so the set is
    exactly invariant under them). Isotropic: all eight; ``oriented`` (horizontal rows): the
    identity, both flips and the half turn."""
    rng = np.random.default_rng(seed)
    sigma = (0.7, 4.0) if oriented else 1.5
    poses = ("rot180", "flip_h", "flip_v") if oriented else DIHEDRAL
    grey = []
    for _ in range(n):
        base = torch.from_numpy(ndimage.gaussian_filter(rng.normal(size=(32, 32)), sigma, mode="wrap"))
        grey += [base] + [dihedral(base, name) for name in poses]
    grey = torch.stack(grey).numpy()
    return np.repeat(grey[:, None] / grey.std(), 3, axis=1)


def test_an_isotropic_texture_allows_all_seven() -> None:
    assert allowed_transforms(_texture(6, 0)) == DIHEDRAL


def test_a_texture_in_rows_allows_flips_and_the_half_turn_only() -> None:
    assert set(allowed_transforms(_texture(10, 1, oriented=True))) == {"rot180", "flip_h", "flip_v"}


def _objects(n: int, seed: int, head: int) -> np.ndarray:
    """n images of a bar with a ``head`` px head at its left end, centred with a 1 px jitter,
    on a plain noisy background: the head breaks the left-right symmetry, nothing else."""
    rng = np.random.default_rng(seed)
    out = rng.normal(0.0, 0.05, (n, 32, 32))
    for i in range(n):
        dy, dx = rng.integers(-1, 2, 2)
        out[i, 15 + dy:17 + dy, 6 + dx:26 + dx] += 1.0
        out[i, 16 - head // 2 + dy:16 + head - head // 2 + dy, 6 + dx:9 + dx] += 1.0
    return np.repeat(out[:, None], 3, axis=1)


def test_an_object_allows_only_what_keeps_it_where_it_is() -> None:
    allowed = allowed_transforms(_objects(40, 2, head=8))
    assert "flip_h" not in allowed and "rot90" not in allowed and "rot180" not in allowed
    assert "flip_v" in allowed  # the bar and its head are symmetric top to bottom


def test_a_small_asymmetry_on_a_plain_background_is_caught_by_the_outlier_share() -> None:
    # The rule's amendment: a few moved pixels with a large z, diluted in the root mean square.
    from diffad_core.data import symmetry

    images = _objects(40, 3, head=4)
    grey = images.mean(axis=1)
    mean, var = torch.from_numpy(grey.mean(0)), torch.from_numpy(grey.var(0, ddof=1))
    z = (mean - dihedral(mean, "flip_h")) / ((var + dihedral(var, "flip_h")) / len(grey)).sqrt()
    assert float(z.pow(2).mean().sqrt()) <= symmetry._Z_LIMIT  # the first test alone lets it through
    assert float((z.abs() > symmetry._OUTLIER_Z).double().mean()) > symmetry._OUTLIER_SHARE
    assert "flip_h" not in allowed_transforms(images)


def test_too_few_or_non_square_images_allow_nothing() -> None:
    assert allowed_transforms(_texture(1, 0)[:1]) == ()
    assert allowed_transforms(np.zeros((4, 3, 8, 6))) == ()


def _split(images: np.ndarray, category: str = "a") -> PreparedSplit:
    n = len(images)
    return PreparedSplit(category, "train", images.astype(np.float32), np.zeros((n, 8, 8), np.uint8),
                         np.zeros(n, np.int64), ["good"] * n, [f"{category}/{i}.png" for i in range(n)])


def test_train_images_show_each_image_as_it_is_or_under_an_allowed_transform() -> None:
    rng = np.random.default_rng(0)
    split = _split(rng.uniform(-1, 1, (2, 3, 8, 8)))
    large = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    split.feature_images = large
    ds = TrainImages([split], 5.0, False, {"a": 0}, seed=1, transforms=[("flip_h", "rot90")])
    image = torch.from_numpy(split.images[1])
    seen = set()
    for _ in range(60):
        out, target, _ = ds[1]
        for name, transform in (("none", lambda x: x), ("flip_h", lambda x: dihedral(x, "flip_h")),
                                ("rot90", lambda x: dihedral(x, "rot90"))):
            if torch.equal(out, transform(image)):
                seen.add(name)
                # The feature target's input gets the same transform.
                assert torch.equal(target, transform(torch.from_numpy(large[1])))
    assert seen == {"none", "flip_h", "rot90"}
    with pytest.raises(ValueError, match="unknown transforms"):
        TrainImages([split], 5.0, False, {"a": 0}, transforms=[("shear",)])
    with pytest.raises(ValueError, match="1 transform lists for 2"):
        TrainImages([split, split], 5.0, False, {"a": 0}, transforms=[()])


def test_a_split_without_transforms_draws_exactly_what_it_drew_before() -> None:
    # No extra random draw: rotation angles (and so trainings with "none") stay as they were.
    rng = np.random.default_rng(1)
    a, b = _split(rng.uniform(-1, 1, (3, 3, 8, 8))), _split(rng.uniform(-1, 1, (3, 3, 8, 8)), "b")
    plain = TrainImages([a], 5.0, True, {"a": 0}, seed=4)
    empty = TrainImages([a, b], 5.0, True, {"a": 0, "b": 1}, seed=4, transforms=[(), ("rot180",)])
    assert all(torch.equal(plain[i % 3][0], empty[i % 3][0]) for i in range(6))
