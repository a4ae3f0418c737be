"""Preprocessing cache, TrainImages (rotation augmentation) and resolve_dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_builders import build_mvtec, write_image
from PIL import Image

import diffad_core.data.prepare as prepare_mod
from diffad_core.cli import main
from diffad_core.config import load_config
from diffad_core.data import (
    DatasetLayoutError,
    PreparedSplit,
    TrainImages,
    cache_path,
    list_samples,
    load_mask,
    prepare_split,
    resolve_dataset,
    rotate,
)


def _cfg(root: Path, *extra: str):
    return load_config("smoke", overrides=["data.dataset=mvtec", f"data.root={root}",
                                           "data.image_size=8", "data.categories=[bottle]",
                                           *extra])


def _fail_loader(*_args: object, **_kw: object) -> None:
    raise AssertionError("decoded an image although the cache should have answered")


def test_prepare_split_values_and_cache_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = build_mvtec(tmp_path / "mv", categories=("bottle",), size=16)
    cfg = _cfg(root)
    train = prepare_split(cfg, "bottle", "train")
    assert train.images.shape == (3, 3, 8, 8) and train.images.dtype == np.float32
    assert train.rel_paths == [f"bottle/train/good/00{i}.png" for i in range(3)]
    # Constant value v (bright top-left pixel aside) maps to v / 255 * 2 - 1 (METHOD.md §1).
    assert train.images[1, :, 4, 4] == pytest.approx([10 / 255 * 2 - 1] * 3, abs=1e-6)
    assert train.images[2, 0, 0, 0] > train.images[2, 0, 4, 4]
    assert -1.0 <= train.images.min() and train.images.max() <= 1.0
    test = prepare_split(cfg, "bottle", "test")
    assert list(test.labels) == [1, 1, 0] and test.defect_types == ["broken", "crack", "good"]
    samples = list_samples(root, "mvtec", "bottle", "test")
    assert np.array_equal(test.masks[0], load_mask(samples[0].mask_path, 8))
    assert test.masks[0].sum() > 0 and test.masks[2].sum() == 0
    assert cache_path(test.manifest_hash, 8, "test").is_file()

    monkeypatch.setattr(prepare_mod, "load_image", _fail_loader)
    monkeypatch.setattr(prepare_mod, "load_mask", _fail_loader)
    again = prepare_split(cfg, "bottle", "test")
    assert np.array_equal(again.images, test.images) and np.array_equal(again.masks, test.masks)
    assert again.rel_paths == test.rel_paths and again.defect_types == test.defect_types

    write_image(root / "bottle/test/good/000.png", 77, size=16)  # new content: new cache key
    with pytest.raises(AssertionError, match="decoded an image"):
        prepare_split(cfg, "bottle", "test")


def test_prepare_without_cache_writes_nothing(tmp_path: Path, _isolated_home: Path) -> None:
    root = build_mvtec(tmp_path / "mv", categories=("bottle",), size=8)
    split = prepare_split(_cfg(root, "data.cache=false"), "bottle", "train")
    assert len(split) == 3
    assert not any(p.suffix == ".npz" for p in _isolated_home.rglob("*"))


def test_prepare_16bit_precision(tmp_path: Path) -> None:
    root = build_mvtec(tmp_path / "mv", categories=("bottle",), n_train=1, size=8)
    Image.fromarray(np.full((8, 8), 12345, dtype=np.uint16)).save(root / "bottle/train/good/000.png")
    img = prepare_split(_cfg(root), "bottle", "train").images[0]
    assert np.allclose(img, 12345 / 65535 * 2 - 1, atol=1e-6)
    cached = prepare_split(_cfg(root), "bottle", "train").images[0]  # from the .npz
    assert np.array_equal(img, cached)


def _split(n: int = 4, size: int = 8, category: str = "a", seed: int = 0) -> PreparedSplit:
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (n, 3, size, size)).astype(np.float32)
    return PreparedSplit(category, "train", images, np.zeros((n, size, size), np.uint8),
                         np.zeros(n, np.int64), ["good"] * n, [f"{category}/{i}.png" for i in range(n)])


def test_train_images_without_augment_is_identity() -> None:
    a, b = _split(2, category="a"), _split(3, category="b", seed=1)
    ds = TrainImages([a, b], 5.0, False, {"a": 0, "b": 7})
    assert len(ds) == 5
    image, target_input, cls = ds[3]
    assert cls == 7 and torch.equal(image, torch.from_numpy(b.images[1]))
    assert target_input is image  # no feature_images: the target sees the image itself
    assert TrainImages([a], 0.0, True, {"a": 0})[1][0].equal(torch.from_numpy(a.images[1]))
    with pytest.raises(KeyError, match="'b'"):
        TrainImages([b], 5.0, True, {"a": 0})


def test_train_images_crops_are_seeded_windows_of_the_image() -> None:
    split = _split(2, size=16)
    ds = TrainImages([split], 5.0, False, {"a": 0}, seed=3, crop=8)
    whole = torch.from_numpy(split.images[1])
    crops = [ds[1][0] for _ in range(20)]
    assert all(c.shape == (3, 8, 8) for c in crops)
    windows = {(t, l) for t in range(9) for l in range(9)
               for c in crops if torch.equal(c, whole[:, t:t + 8, l:l + 8])}
    assert len(windows) > 5  # random windows, each an exact slice of the image
    again = TrainImages([split], 5.0, False, {"a": 0}, seed=3, crop=8)
    assert all(torch.equal(again[1][0], c) for c in crops[:5])  # the seed decides them
    rotated = TrainImages([split], 5.0, True, {"a": 0}, seed=3, crop=8)
    assert rotated[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="crop=17"):
        TrainImages([split], 5.0, False, {"a": 0}, crop=17)


def test_train_images_rotation_is_seeded_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    split = _split(2, size=16)
    def draws(seed: int) -> list[torch.Tensor]:
        ds = TrainImages([split], 5.0, True, {"a": 0}, seed=seed)
        return [ds[i % 2][0] for i in range(4)]

    first, second, other = draws(3), draws(3), draws(4)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(second[0], second[2])  # a new angle on every access
    assert not torch.equal(first[0], torch.from_numpy(split.images[0]))
    ds = TrainImages([split], 5.0, True, {"a": 0}, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ds[0][0], first[0])
    ds.set_epoch(2)
    epoch2 = ds[1][0]
    ds.set_epoch(2)
    assert torch.equal(ds[1][0], epoch2) and not torch.equal(epoch2, first[1])

    angles: list[float] = []
    monkeypatch.setattr(prepare_mod, "rotate",
                        lambda img, deg, padding: angles.append(deg) or img)
    ds = TrainImages([split], 5.0, True, {"a": 0}, seed=0)
    for i in range(200):
        ds[i % 2]
    assert max(abs(a) for a in angles) <= 5.0 and min(angles) < -3.5 and max(angles) > 3.5


def test_train_images_rotate_feature_images_by_the_same_angle() -> None:
    small, large = _split(3, size=8), _split(3, size=32, seed=5)
    small.feature_images = large.images
    plain = TrainImages([small], 5.0, False, {"a": 0})
    image, target_input, _ = plain[2]
    assert torch.equal(image, torch.from_numpy(small.images[2]))
    assert torch.equal(target_input, torch.from_numpy(large.images[2]))
    rotated = TrainImages([small], 5.0, True, {"a": 0}, seed=3)
    angle = (2.0 * torch.rand((), generator=torch.Generator().manual_seed(3)).item() - 1.0) * 5.0
    image, target_input, _ = rotated[2]
    assert torch.equal(image, rotate(torch.from_numpy(small.images[2]), angle))
    assert torch.equal(target_input, rotate(torch.from_numpy(large.images[2]), angle))
    with pytest.raises(ValueError, match="crop"):
        TrainImages([small], 5.0, False, {"a": 0}, crop=4)
    with pytest.raises(ValueError, match="every prepared split"):
        TrainImages([small, _split(2, category="b")], 5.0, False, {"a": 0, "b": 1})


def test_prepare_split_carries_feature_images_at_their_size(tmp_path: Path) -> None:
    root = build_mvtec(tmp_path / "mv", categories=("bottle",), size=16)
    test = prepare_split(_cfg(root, "features.image_size=16"), "bottle", "test")
    assert test.images.shape == (3, 3, 8, 8) and test.feature_images.shape == (3, 3, 16, 16)
    at16 = prepare_split(_cfg(root, "data.image_size=16"), "bottle", "test")
    assert np.array_equal(test.feature_images, at16.images)  # the same images, decoded at 16 px
    assert test.subset(np.array([2, 0])).feature_images.shape == (2, 3, 16, 16)
    assert prepare_split(_cfg(root), "bottle", "test").feature_images is None
    same = prepare_split(_cfg(root, "features.image_size=8"), "bottle", "test")
    assert same.feature_images is None  # at the image size the target sees the images


def test_rotate_golden() -> None:
    a = np.zeros((8, 8), np.float32)
    a[0, 1:4] = 1.0
    a[5, 6] = 0.5
    t = torch.from_numpy(a)[None]
    # Counter-clockwise like PIL's Image.rotate: a 90-degree turn is exactly np.rot90.
    assert torch.equal(rotate(t, 90.0)[0], torch.from_numpy(np.rot90(a).copy()))
    assert torch.equal(rotate(t, 0.0), t)
    const = torch.full((2, 3, 12, 12), 0.25)
    assert torch.allclose(rotate(const, 4.0), const, atol=1e-6)  # reflection: no black corners
    assert rotate(const, 4.0, "zeros")[0, 0, 0, 0] < 0.2


def test_resolve_dataset(tmp_path: Path) -> None:
    root = build_mvtec(tmp_path / "mv", categories=("bottle",))
    unreachable = ["data.sources={mvtec: {filename: x.tar.xz, urls: ['http://127.0.0.1:9/x'], "
                   "sha256: '00'}}"]
    assert resolve_dataset(_cfg(root, *unreachable), progress=False) == root
    with pytest.raises(DatasetLayoutError, match=r"\['cable'\] are not under"):
        resolve_dataset(_cfg(root, "data.categories=[cable]", *unreachable), progress=False)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        resolve_dataset(_cfg(tmp_path / "nope", "data.dataset=folder"), progress=False)
    syn = load_config("smoke", overrides=[f"data.root={tmp_path / 'syn'}", "data.categories=[weave]",
                                          "data.synth.n_train=2", "data.synth.size=32"])
    assert resolve_dataset(syn, progress=False) == tmp_path / "syn"
    assert len(list_samples(tmp_path / "syn", "synthetic", "weave", "train")) == 2


def test_cli_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "prepare", "--preset", "smoke", "--no-progress",
                 "--set", f"data.root={tmp_path / 'syn'}", "--set", "data.categories=[bolt]",
                 "--set", "data.synth.n_train=2", "--set", "data.synth.size=32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "bolt train: 2 images at 32px" in out and "manifest: " in out


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "synth", "--root", str(tmp_path / "s"), "--category", "weave",
                 "--size", "32", "--n-train", "2", "--n-test-good", "1",
                 "--n-test-per-defect", "1", "--seed", "5"])
    assert code == 0 and "synthetic dataset written" in capsys.readouterr().out
    assert len(list_samples(tmp_path / "s", "synthetic", "weave", "train")) == 2
    assert main(["data", "verify", "--root", str(tmp_path / "s"), "--dataset", "synthetic"]) == 0


def test_cli_module_and_light_names_do_not_import_torch() -> None:
    code = ("import sys, diffad_core.data as d, diffad_core.cli as c; "
            "d.list_categories, d.load_image, d.verify_dataset, d.dataset_manifest; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
