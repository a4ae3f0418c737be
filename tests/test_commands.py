"""The method's CLI (train, score, reconstruct, evaluate, predict, model-info) on a tiny smoke
model trained once per session, plus checkpoint resolution and the overlay helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad_core import _commands
from diffad_core._commands import CommandError, register_checkpoint_resolver, resolve_checkpoint
from diffad_core.cli import main
from diffad_core.overlay import jet, overlay, side_by_side, to_uint8_image

SMOKE_SET = ["--set", "data.categories=[weave]", "--set", "data.synth.categories=[weave]",
             "--set", "runtime.num_threads=1"]


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """DIFFAD_HOME in tmp for the whole session (synthetic data lands under it)."""
    path = tmp_path_factory.mktemp("diffad_home")
    old = os.environ.get("DIFFAD_HOME")
    os.environ["DIFFAD_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DIFFAD_HOME", None)
    else:
        os.environ["DIFFAD_HOME"] = old


@pytest.fixture(scope="session")
def checkpoint(home: Path) -> Path:
    """`diffad train` on the smoke preset (4 steps, synthetic data), default output folder."""
    import torch

    torch.set_num_threads(1)
    code = main(["train", "--preset", "smoke", *SMOKE_SET, "--category", "weave", "--quiet"])
    assert code == 0
    ckpt = home / "checkpoints" / "synthetic" / "smoke" / "weave"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "padim.safetensors").is_file()
    return ckpt


def test_score_then_evaluate(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    from diffad_core.results import read_scores

    run = tmp_path / "run1"
    assert main(["score", "--checkpoint", str(checkpoint), "--run-dir", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "scored 7 images of weave" in out and "pixel_auroc" in out
    scores = read_scores(run)
    assert len(scores) == 7 and set(scores["label"]) == {0, 1}
    assert np.isfinite(scores["image_score"]).all()

    assert main(["evaluate", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "weave" in out and "mean" in out
    metrics = pd.read_parquet(run / "metrics.parquet")
    row = metrics[metrics["category"] == "weave"].iloc[0]
    assert 0.0 <= row["pixel_auroc"] <= 1.0 and 0.0 <= row["pro"] <= 1.0


def test_reconstruct_writes_side_by_side_pngs(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    assert main(["reconstruct", "--checkpoint", str(checkpoint), "--limit", "1", "--out", str(out),
                 "--quiet"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 1 and "good" not in files[0].name  # anomalous images come first
    w, h = Image.open(files[0]).size
    assert h == 32 and w == 2 * 32 + 4


def test_predict_writes_overlays_and_prints_scores(
    checkpoint: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test_dir = home / "data" / "synthetic" / "weave" / "test"
    images = sorted(test_dir.glob("*/000.png"))[:2]
    assert len(images) == 2
    out = tmp_path / "pred"
    assert main(["predict", *map(str, images), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 2
    for line, img in zip(lines, images):
        path, score, png = line.split("\t")
        assert path == str(img) and np.isfinite(float(score)) and Path(png).is_file()
    assert len(list(out.glob("*.png"))) == 2  # same stem in two folders: no overwrite


def test_predict_missing_image_fails_clearly(checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["predict", str(tmp_path / "nope.png"), "--checkpoint", str(checkpoint)])
    assert code == 1
    assert "nope.png does not exist" in capsys.readouterr().err


def test_model_info_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model-info", "--preset", "smoke"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info["parameters"], int) and info["parameters"] > 0


def test_model_info_bad_override_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model-info", "--preset", "smoke", "--set", "unet.nope=1"]) == 2
    assert "unet.nope" in capsys.readouterr().err


def test_resolve_checkpoint_local_and_errors(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "ck").mkdir()
    with pytest.raises(CommandError, match="model.safetensors is missing"):
        resolve_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "ck" / "config.json").write_text("{}")
    assert resolve_checkpoint(str(tmp_path / "ck")) == tmp_path / "ck"
    assert resolve_checkpoint(f"file://{tmp_path / 'ck'}") == tmp_path / "ck"
    with pytest.raises(CommandError, match="no resolver for scheme 'zz3:'"):
        resolve_checkpoint("zz3://bucket/model")


def test_registered_resolver_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(_commands, "_RESOLVERS", dict(_commands._RESOLVERS))
    seen: list[str] = []

    def fake(spec: str) -> Path:
        seen.append(spec)
        return tmp_path

    register_checkpoint_resolver("testscheme", fake)
    assert resolve_checkpoint("testscheme:/diffad-x@champion") == tmp_path
    assert seen == ["testscheme:/diffad-x@champion"]
    with pytest.raises(ValueError):
        register_checkpoint_resolver("1bad", fake)


def test_jet_colormap_and_overlay() -> None:
    c = jet(np.array([0.0, 0.5, 1.0]))
    assert c.dtype == np.uint8 and c.shape == (3, 3)
    assert c[0, 2] > c[0, 0] and c[2, 0] > c[2, 2]  # blue at 0, red at 1
    assert c[1, 1] == 255  # green in the middle
    img = np.zeros((3, 4, 5), dtype=np.float32)
    amap = np.zeros((4, 5))
    amap[1, 2] = 1.0
    o = overlay(img, amap, opacity=0.5)
    assert o.shape == (4, 5, 3) and o[1, 2, 0] > o[0, 0, 0]
    assert side_by_side([to_uint8_image(img), o], gap=2).shape == (4, 12, 3)
    with pytest.raises(ValueError, match="does not match"):
        overlay(img, np.zeros((2, 2)))
