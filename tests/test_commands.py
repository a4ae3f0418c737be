"""The ``diffad`` CLI (``diffad_core.cli``): the error policy, one spelling per flag, checkpoint
specs, and the method's commands (train, score, reconstruct, evaluate, predict, model-info) on a
tiny smoke model trained once per session."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffad_core.cli as cli
from diffad_core.cli import CliError, build_parser, main, resolve_checkpoint
from diffad_core.cli import method as method_commands
from diffad_core.overlay import jet, overlay, side_by_side, to_uint8_image

SMOKE_SET = ["--set", "data.categories=[weave]", "--set", "data.synth.categories=[weave]",
             "--set", "runtime.num_threads=1"]


def _leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser that runs a command (``diffad data verify``, ``diffad train``, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _fake_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "config.json").write_text("{}")
    return folder


# ----------------------------------------------------------------------------- parser and flags
def test_help_imports_nothing_heavy() -> None:
    code = ("import sys; from diffad_core.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'timm', 'prefect', 'mlflow', 'pandas') if m in sys.modules]; "
            "sys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_one_spelling_per_flag() -> None:
    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) >= 11
    for p in leaves:
        opts = _options(p)
        assert not opts & {"--quiet", "--categories", "--model"}, p.prog
        # every category choice is the repeatable --category
        for a in p._actions:
            if "--category" in a.option_strings:
                assert isinstance(a, argparse._AppendAction) and a.dest == "categories", p.prog
        # progress is switched off with --no-progress only
        progress = [a for a in p._actions if a.dest == "progress"]
        assert all(a.option_strings == ["--no-progress"] for a in progress), p.prog


@pytest.mark.parametrize("argv", [
    ["train"], ["score", "--checkpoint", "ck"], ["reconstruct", "--checkpoint", "ck", "--out", "o"],
    ["data", "download", "--dataset", "mvtec"], ["data", "synth", "--root", "r"],
    ["data", "heldout", "--root", "r"], ["data", "prepare"], ["benchmark"], ["rerun", "--run-id", "r"],
])
def test_no_progress_is_accepted_where_progress_is_shown(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).progress is True
    assert build_parser().parse_args([*argv, "--no-progress"]).progress is False


@pytest.mark.parametrize("argv", [
    ["train"], ["score", "--checkpoint", "ck"], ["predict", "x.png", "--checkpoint", "ck"],
    ["data", "verify", "--root", "r"], ["data", "synth", "--root", "r"],
    ["data", "heldout", "--root", "r"],
])
def test_category_is_repeatable(argv: list[str]) -> None:
    args = build_parser().parse_args([*argv, "--category", "a", "--category", "b"])
    assert args.categories == ["a", "b"]
    assert build_parser().parse_args(argv).categories is None


def test_one_category_commands_refuse_several(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = _fake_checkpoint(tmp_path / "ck")
    for argv in (["score", "--checkpoint", str(ck)], ["reconstruct", "--checkpoint", str(ck), "--out", "o"]):
        assert main([*argv, "--category", "weave", "--category", "bolt"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"diffad {argv[0]}: error: this command takes one --category, got 2: weave, bolt"]
    assert main(["train", "--preset", "smoke", "--category", "weave", "--category", "bolt"]) == 2
    assert "one --category at a time" in capsys.readouterr().err


def test_pipeline_commands_only_when_the_pipeline_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"benchmark", "rerun", "registry"} <= set(choices)
    monkeypatch.setattr(cli, "pipeline_available", lambda: False)
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert not {"benchmark", "rerun", "registry"} & set(choices)
    assert {"train", "score", "predict", "data"} <= set(choices)


# ----------------------------------------------------------------------------- error policy
def test_user_error_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"diffad score: error: checkpoint '{tmp_path / 'missing'}': folder ")
    assert "does not exist" in err and "Traceback" not in err


def test_bad_set_key_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model-info", "--preset", "smoke", "--set", "unet.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffad model-info: error: invalid configuration")
    assert "unknown key 'unet.nope'" in err


def test_nested_command_names_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "heldout", "--root", str(tmp_path), "--category", "gravel"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffad data heldout: error: unknown held-out categories ['gravel']")


def test_debug_reraises_with_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="does not exist"):
        main(["--debug", "score", "--checkpoint", str(tmp_path / "missing")])
    proc = subprocess.run([sys.executable, "-m", "diffad_core.cli", "--debug", "score",
                           "--checkpoint", str(tmp_path / "missing")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "CliError" in proc.stderr


def test_a_bug_gets_a_short_line_and_the_debug_hint(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise TypeError("unsupported operand")

    monkeypatch.setattr(method_commands, "_model_info", broken)
    assert main(["model-info"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["diffad model-info: internal error: TypeError: unsupported operand",
                   "diffad model-info: this is a bug; run 'diffad --debug model-info ...' "
                   "to see the traceback"]
    with pytest.raises(TypeError):
        main(["--debug", "model-info"])


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(method_commands, "_model_info", interrupted)
    assert main(["model-info"]) == 130
    assert capsys.readouterr().err == "diffad model-info: interrupted\n"


def test_usage_errors_stay_argparse_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["score"])
    assert exc.value.code == 2
    assert "diffad score: error: the following arguments are required: --checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoint specs
def test_resolve_checkpoint_local_and_errors(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "ck").mkdir()
    with pytest.raises(CliError, match="model.safetensors is missing"):
        resolve_checkpoint(tmp_path / "ck")
    _fake_checkpoint(tmp_path / "ck")
    assert resolve_checkpoint(str(tmp_path / "ck")) == tmp_path / "ck"
    assert resolve_checkpoint(f"file://{tmp_path / 'ck'}") == tmp_path / "ck"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CliError, match="is not a folder"):
        resolve_checkpoint(tmp_path / "file.txt")
    with pytest.raises(CliError, match="unknown scheme 'zz3:'"):
        resolve_checkpoint("zz3://bucket/model")


# ----------------------------------------------------------------------------- the method
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
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "--preset", "smoke", *SMOKE_SET, "--category", "weave", "--no-progress"])
    assert code == 0
    info = json.loads(out.getvalue().strip().splitlines()[-1])
    ckpt = Path(info["checkpoint_dir"])
    assert info["categories"] == ["weave"]
    assert ckpt.is_relative_to(home / "checkpoints")
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "padim.safetensors").is_file()
    return ckpt


def test_train_unknown_category_exits_2(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "smoke", *SMOKE_SET, "--category", "nope", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffad train: error: unknown categories ['nope']")


def test_score_then_evaluate(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    from diffad_core.results import read_scores

    run = tmp_path / "run1"
    assert main(["score", "--checkpoint", str(checkpoint), "--run-dir", str(run), "--no-progress"]) == 0
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


def test_unknown_category_of_a_checkpoint_exits_2(checkpoint: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", "--checkpoint", str(checkpoint), "--category", "bolt",
                 "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("diffad score: error: category 'bolt' is not in this checkpoint")


def test_evaluate_missing_run_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--run-dir", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"diffad evaluate: error: run folder {tmp_path / 'nope'} does not exist\n"


def test_reconstruct_writes_side_by_side_pngs(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    assert main(["reconstruct", "--checkpoint", str(checkpoint), "--limit", "1", "--out", str(out),
                 "--no-progress"]) == 0
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


def test_predict_says_how_it_resized_a_non_square_image(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue #10 item 9: the training preprocessing, and a line saying what it did."""
    from PIL import Image

    image = tmp_path / "wide.png"
    Image.fromarray(np.full((30, 90, 3), 120, np.uint8)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]) == 0
    size = json.loads((checkpoint / "config.json").read_text())["data"]["image_size"]
    assert (f"{image}: 90x30 resized to {size}x{size} as the training images were "
            "(data.image_size; aspect ratio not kept)") in capsys.readouterr().err


def test_predict_missing_image_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["predict", str(tmp_path / "nope.png"), "--checkpoint", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err == f"diffad predict: error: image {tmp_path / 'nope.png'} does not exist\n"


def test_alpha_out_of_range_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", "--checkpoint", str(tmp_path), "--alpha", "1.5"]) == 2
    assert "--alpha must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_model_info_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model-info", "--preset", "smoke"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info["parameters"], int) and info["parameters"] > 0


# ----------------------------------------------------------------------------- overlays
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
