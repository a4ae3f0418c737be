"""The method's sub-commands (train, score, reconstruct, evaluate, predict, model-info), each a thin
layer over ``diffad_core.usecases`` that imports torch and the model inside its handler."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from diffad_core.cli._common import (
    CliError,
    add_category_argument,
    add_config_arguments,
    add_progress_argument,
    command,
    config_from_args,
    one_category,
    resolve_checkpoint,
)
from diffad_core.config import diffad_home

_CHECKPOINT_HELP = ("checkpoint folder, file:PATH, or a registered model "
                    "models:/diffad-<dataset>-<category>@champion (or .../<version>)")


def register(subparsers: Any) -> None:
    """Add ``train``, ``score``, ``reconstruct``, ``evaluate``, ``predict`` and ``model-info``."""
    p = subparsers.add_parser("train", help="train one category's model (or the unified model)")
    add_config_arguments(p)
    add_category_argument(p, "category to train: one in per-category mode, any in unified mode "
                             "(default: the config's only one / all)")
    p.add_argument("--out", default=None, help="checkpoint folder (default: under "
                   "$DIFFAD_HOME/checkpoints/, keyed by the model-defining config)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (runtime.num_threads)")
    add_progress_argument(p)
    command(p, _train)

    p = subparsers.add_parser("score", help="score a category's test split and write the parquet")
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    add_category_argument(p, "the category to score (default: the checkpoint's only one)")
    p.add_argument("--run-dir", default=None,
                   help="results folder (default $DIFFAD_HOME/results/cli-<time>)")
    p.add_argument("--alpha", type=float, default=None, help="override score.alpha (0..1)")
    add_progress_argument(p)
    command(p, _score)

    p = subparsers.add_parser("reconstruct", help="gradient-denoising reconstructions as PNG")
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    add_category_argument(p, "the category (default: the checkpoint's only one)")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N images, anomalous first (default reconstruct.max_images_per_category)")
    p.add_argument("--out", required=True, help="folder for the input | reconstruction PNGs")
    add_progress_argument(p)
    command(p, _reconstruct)

    p = subparsers.add_parser("evaluate", help="metrics from a run's parquet files only")
    p.add_argument("--run-dir", required=True, help="results/<run_id> folder")
    p.add_argument("--migrate", action="store_true",
                   help="first convert a run written by diffad before the tensor parquet format")
    command(p, _evaluate)

    p = subparsers.add_parser("predict", help="anomaly heat-map overlays and scores of image files")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    add_category_argument(p, "the category (default: the checkpoint's only one)")
    p.add_argument("--out", default=None, help="folder for the overlay PNGs (default ./predictions)")
    p.add_argument("--alpha", type=float, default=None, help="override score.alpha (0..1)")
    command(p, _predict)

    p = subparsers.add_parser("model-info", help="print the resolved network config and size as JSON")
    add_config_arguments(p)
    command(p, _model_info)


# ----------------------------------------------------------------------------- helpers
def _check_alpha(alpha: float | None) -> None:
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise CliError(f"--alpha must be in [0, 1], got {alpha:g}")


def _train_categories(cfg: Any, asked: list[str] | None) -> list[str]:
    """Per-category mode trains exactly one category; the unified model all asked (or all)."""
    if cfg.mode == "unified":
        return list(asked) if asked else cfg.categories()
    if asked:
        if len(asked) > 1:
            raise CliError(f"per-category mode trains one --category at a time, got {', '.join(asked)}")
        return list(asked)
    available = cfg.categories()
    if len(available) != 1:
        raise CliError(f"choose a category with --category (one of: {', '.join(available)})")
    return available


def _load(args: argparse.Namespace) -> tuple[Any, str]:
    """The checkpoint (with its own config) and the category to work on."""
    category = one_category(args)
    checkpoint = resolve_checkpoint(args.checkpoint)  # spec errors before torch is imported
    from diffad_core.usecases import load_for_evaluation, pick_category

    ev = load_for_evaluation(checkpoint)
    return ev, pick_category(ev.model, category)


def _png_name(rel_path: str) -> str:
    return rel_path.replace("/", "__").rsplit(".", 1)[0] + ".png"


def _output_names(paths: list[Path]) -> list[str]:
    """``<stem>_anomaly.png`` per input; prefixed by the parent folder (then an index) on clashes."""
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [f"{n}_{i}_anomaly.png" if names.count(n) > 1 else f"{n}_anomaly.png"
            for i, n in enumerate(names)]


# ----------------------------------------------------------------------------- handlers
def _train(args: argparse.Namespace) -> int:
    extra = {"runtime": {"num_threads": args.threads}} if args.threads else None
    cfg = config_from_args(args, extra)
    categories = _train_categories(cfg, args.categories)
    from diffad_core.usecases import train_category

    result = train_category(cfg, categories, Path(args.out) if args.out else None,
                            resume=not args.no_resume, progress=args.progress)
    print(json.dumps({
        "checkpoint_dir": str(result.checkpoint_dir), "categories": categories,
        "steps": result.steps, "seconds": round(float(result.seconds), 2),
        "final_loss": result.final_loss,
    }))
    return 0


def _score(args: argparse.Namespace) -> int:
    _check_alpha(args.alpha)
    ev, category = _load(args)
    from diffad_core import results
    from diffad_core.usecases import score_category

    run_dir = Path(args.run_dir) if args.run_dir else (
        diffad_home() / "results" / time.strftime("cli-%Y%m%d-%H%M%S"))
    out = score_category(ev, category, run_dir, model_version=str(args.checkpoint),
                         alpha=args.alpha, progress=args.progress)
    where = out.parts[0].parent if out.parts else run_dir
    print(f"scored {out.n_test} images of {category} ({out.score_ms_per_image:.0f} ms/image, "
          f"alpha={out.alpha:g} from {out.alpha_source}); wrote {len(out.parts)} part(s) under {where}")
    metrics = results.evaluate_run(
        run_dir, {category: {"score_ms_per_image": out.score_ms_per_image}},
        categories=[category], fpr_limit=ev.cfg.metrics.pro_fpr_limit, write=False)
    row = metrics[metrics["category"] == category]
    cols = [c for c in ("category", "pixel_auroc", "pro", "image_auroc", "n_test") if c in row]
    print(row[cols].to_string(index=False))
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise CliError(f"--limit must be >= 0, got {args.limit}")
    ev, category = _load(args)
    from diffad_core.overlay import save_png, side_by_side
    from diffad_core.usecases import reconstruct_category

    if not ev.cfg.reconstruct.enabled:
        raise CliError(f"reconstruction is disabled in this checkpoint's config "
                       f"(reconstruct.enabled: false): {ev.checkpoint}")
    outcome = reconstruct_category(ev, category, limit=args.limit, progress=args.progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for rel_path, rec in outcome.images.items():
        print(save_png(side_by_side([rec.input_image, rec.reconstruction]), out / _png_name(rel_path)))
    speed = f" ({outcome.ms_per_image:.0f} ms/image)" if outcome.ms_per_image else ""
    print(f"reconstructed {len(outcome.images)} images of {category}{speed} into {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from diffad_core import results

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CliError(f"run folder {run_dir} does not exist")
    if args.migrate:
        for category in results.migrate_run(run_dir):
            print(f"migrated {category}")
    table = results.evaluate_run(run_dir)
    print(table.to_string(index=False))
    print(f"wrote {run_dir / 'metrics.parquet'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    _check_alpha(args.alpha)
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CliError(f"image {missing[0]} does not exist"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    ev, category = _load(args)
    from diffad_core.overlay import overlay, save_png, side_by_side, to_uint8_image
    from diffad_core.usecases import predict_images

    prediction = predict_images(ev, category, paths, alpha=args.alpha)
    _say_resized(paths, int(ev.cfg.data.image_size))
    out = Path(args.out) if args.out else Path("predictions")
    for j, (p, name) in enumerate(zip(paths, _output_names(paths))):
        image = prediction.images[j]
        panel = side_by_side([to_uint8_image(image), overlay(image, prediction.anomaly_maps[j])])
        print(f"{p}\t{float(prediction.image_scores[j]):.6f}\t{save_png(panel, out / name)}")
    return 0


def _say_resized(paths: list[Path], size: int) -> None:
    """One stderr line per image whose size is not the model's: it was resized as the training
    images were (``data.load_image``: bicubic to size x size, so a non-square one is stretched)."""
    from diffad_core.data import image_size

    for p in paths:
        w, h = image_size(p)
        if (w, h) != (size, size):
            note = "; aspect ratio not kept" if w != h else ""
            print(f"{p}: {w}x{h} resized to {size}x{size} as the training images were "
                  f"(data.image_size{note})", file=sys.stderr)


def _model_info(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from diffad_core.nets import model_summary

    print(json.dumps(model_summary(cfg), indent=2, default=str))
    return 0
