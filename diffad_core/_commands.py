"""The method's sub-commands: ``train``, ``score``, ``reconstruct``, ``evaluate``, ``predict``,
``model-info``.

Nothing heavy is imported at module level (torch, timm, the nets): each handler imports what it
needs, so ``diffad --help`` stays fast. Checkpoints are named through :func:`resolve_checkpoint`,
which understands local folders; other schemes (``models:/...``) work once a resolver is
registered with :func:`register_checkpoint_resolver` (the pipeline registers the MLflow one).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffad_core._cli_common import add_config_arguments, config_from_args
from diffad_core.config import ConfigError, diffad_home

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(.*)$")
_RESOLVERS: dict[str, Callable[[str], Path]] = {}


class CommandError(RuntimeError):
    """A failure the CLI reports as one clear line and a non-zero exit code."""


# ----------------------------------------------------------------------------- checkpoints
def register_checkpoint_resolver(scheme: str, fn: Callable[[str], Path]) -> None:
    """Let ``resolve_checkpoint`` handle ``<scheme>:...`` specs with ``fn(spec) -> local dir``."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme) or len(scheme) < 2:
        raise ValueError(f"invalid checkpoint scheme {scheme!r}")
    _RESOLVERS[scheme.lower()] = fn


def resolve_checkpoint(spec: str | Path) -> Path:
    """A checkpoint spec -> a local checkpoint folder holding model.safetensors and config.json.

    Local paths (and ``file:`` URLs) are checked directly; any other scheme goes to the resolver
    registered for it, else a clear error.
    """
    text = str(spec)
    match = _SCHEME.match(text)
    # Single letters are Windows drive letters, not schemes.
    if match and len(match.group(1)) > 1 and not Path(text).exists():
        scheme = match.group(1).lower()
        if scheme == "file":
            path = Path(re.sub(r"^/+", "/", match.group(2)))
        elif scheme in _RESOLVERS:
            path = Path(_RESOLVERS[scheme](text))
        else:
            known = ", ".join(sorted(_RESOLVERS)) or "none registered"
            raise CommandError(
                f"cannot resolve checkpoint {text!r}: no resolver for scheme '{scheme}:' "
                f"(known schemes: {known}); pass a local checkpoint folder instead"
            )
    else:
        path = Path(text).expanduser()
    if not path.exists():
        raise CommandError(f"checkpoint {text!r}: folder {path} does not exist")
    if not path.is_dir():
        raise CommandError(f"checkpoint {text!r}: {path} is not a folder")
    for name in ("model.safetensors", "config.json"):
        if not (path / name).is_file():
            raise CommandError(f"checkpoint {text!r}: {path / name} is missing (not a diffad checkpoint?)")
    return path


def _default_checkpoint_dir(cfg: Any, category: str | None) -> Path:
    name = category if cfg.mode == "per_category" else "unified"
    return diffad_home() / "checkpoints" / cfg.data.dataset / cfg.preset / str(name)


def _errors_to_exit(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report expected failures as one line on stderr with exit code 1 (config errors: 2)."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ConfigError:
            raise
        except Exception as exc:
            # Our own error classes and bad-input errors are expected: one line, exit 1.
            # Anything else is a bug and keeps its traceback.
            ours = type(exc).__module__.startswith("diffad_core")
            if not (ours or isinstance(exc, (FileNotFoundError, ValueError, KeyError))):
                raise
            print(f"diffad {args.command}: error: {exc}", file=sys.stderr)
            return 1

    return wrapper


def _load(checkpoint: str) -> Any:
    from diffad_core.train import load_model

    return load_model(resolve_checkpoint(checkpoint))


def _pick_category(model: Any, category: str | None) -> str:
    cats = list(model.meta.get("categories", [])) if isinstance(model.meta, dict) else []
    cats = cats or list(model.class_index)
    if category is None:
        if len(cats) != 1:
            raise CommandError(f"this checkpoint holds categories {cats}; choose one with --category")
        return cats[0]
    if cats and category not in cats:
        raise CommandError(f"category {category!r} is not in this checkpoint (it has {cats})")
    return category


# ----------------------------------------------------------------------------- train
@_errors_to_exit
def _cmd_train(args: argparse.Namespace) -> int:
    from diffad_core.data import resolve_dataset
    from diffad_core.train import train_model

    cfg = config_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    available = cfg.categories()
    if cfg.mode == "unified":
        categories = [args.category] if args.category else available
    else:
        if args.category is None:
            if len(available) != 1:
                raise CommandError(f"choose a category with --category (one of: {', '.join(available)})")
            categories = available
        else:
            categories = [args.category]
    for c in categories:
        if c not in available:
            raise CommandError(f"unknown category {c!r} for this config (choose from {', '.join(available)})")
    resolve_dataset(cfg, progress=not args.quiet)
    out = Path(args.out) if args.out else _default_checkpoint_dir(cfg, categories[0])
    result = train_model(cfg, categories, out, resume=not args.no_resume, progress=not args.quiet)
    print(json.dumps({
        "checkpoint_dir": str(result.checkpoint_dir), "steps": result.steps,
        "seconds": round(float(result.seconds), 2), "final_loss": result.final_loss,
    }))
    return 0


# ----------------------------------------------------------------------------- score
@_errors_to_exit
def _cmd_score(args: argparse.Namespace) -> int:
    from diffad_core import results
    from diffad_core.data import prepare_split, resolve_dataset
    from diffad_core.score import choose_alpha, score_split

    model = _load(args.checkpoint)
    category = _pick_category(model, args.category)
    cfg = model.cfg
    alpha_source = "config"
    alpha = cfg.score.alpha
    if args.alpha is not None:
        alpha, alpha_source = float(args.alpha), "--alpha"
    elif cfg.score.alpha_per_category:
        choice = choose_alpha(model, cfg, category)
        alpha, alpha_source = choice.alpha, choice.source
    resolve_dataset(cfg, progress=not args.quiet)
    prepared = prepare_split(cfg, category, "test")
    run_dir = Path(args.run_dir) if args.run_dir else (
        diffad_home() / "results" / time.strftime("cli-%Y%m%d-%H%M%S"))
    start = time.perf_counter()
    records = score_split(model, prepared, alpha=alpha, progress=not args.quiet)
    parts = results.write_scores(run_dir, category, records, model_version=str(args.checkpoint),
                                 alpha=alpha, alpha_source=alpha_source, preset=cfg.preset)
    seconds = time.perf_counter() - start
    n = len(prepared.labels)
    metrics = results.evaluate_run(
        run_dir, {category: {"score_ms_per_image": 1000.0 * seconds / max(1, n)}},
        categories=[category], fpr_limit=cfg.metrics.pro_fpr_limit, write=False)
    print(f"scored {n} images of {category} in {seconds:.1f} s (alpha={alpha:g} from "
          f"{alpha_source}); wrote {len(parts)} part(s) under {results.partition_dir(run_dir, category)}")
    row = metrics[metrics["category"] == category]
    cols = [c for c in ("category", "pixel_auroc", "pro", "image_auroc", "n_test") if c in row]
    print(row[cols].to_string(index=False))
    return 0


# ----------------------------------------------------------------------------- reconstruct
@_errors_to_exit
def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from diffad_core.data import prepare_split, resolve_dataset
    from diffad_core.overlay import save_png, side_by_side, to_uint8_image
    from diffad_core.reconstruct import reconstruct_split

    model = _load(args.checkpoint)
    category = _pick_category(model, args.category)
    cfg = model.cfg
    resolve_dataset(cfg, progress=not args.quiet)
    prepared = prepare_split(cfg, category, "test")
    limit = args.limit if args.limit is not None else cfg.reconstruct.max_images_per_category
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = 0
    for i, recon in reconstruct_split(model, prepared, limit=limit):
        panel = side_by_side([to_uint8_image(prepared.images[i]), to_uint8_image(recon.numpy())])
        name = prepared.rel_paths[i].replace("/", "__").rsplit(".", 1)[0] + ".png"
        print(save_png(panel, out / name))
        done += 1
    print(f"reconstructed {done} images in {time.perf_counter() - start:.1f} s into {out}")
    return 0


# ----------------------------------------------------------------------------- evaluate
@_errors_to_exit
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from diffad_core import results

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CommandError(f"run folder {run_dir} does not exist")
    table = results.evaluate_run(run_dir)
    print(table.to_string(index=False))
    print(f"wrote {run_dir / 'metrics.parquet'}")
    return 0


# ----------------------------------------------------------------------------- predict
def _output_names(paths: list[Path]) -> list[str]:
    """``<stem>_anomaly.png`` per input; prefixed by the parent folder (then an index) on clashes."""
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [f"{n}_{i}_anomaly.png" if names.count(n) > 1 else f"{n}_anomaly.png"
            for i, n in enumerate(names)]


@_errors_to_exit
def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from diffad_core.data import load_image
    from diffad_core.overlay import overlay, save_png, side_by_side, to_uint8_image
    from diffad_core.score import score_batch

    paths = [Path(p) for p in args.images]
    for p in paths:
        if not p.is_file():
            raise CommandError(f"image {p} does not exist")
    model = _load(args.checkpoint)
    category = _pick_category(model, args.category)
    size = int(model.cfg.data.image_size)
    out = Path(args.out) if args.out else Path("predictions")
    generator = torch.Generator().manual_seed(int(model.cfg.seed))
    bs = int(model.cfg.score.batch_size)
    names = _output_names(paths)
    for lo in range(0, len(paths), bs):
        chunk = paths[lo:lo + bs]
        arrays = []
        for p in chunk:
            try:
                arrays.append(load_image(p, size).transpose(2, 0, 1) * 2.0 - 1.0)
            except Exception as exc:  # unreadable / not an image: name the file
                raise CommandError(f"cannot read image {p}: {exc}") from exc
        images = torch.from_numpy(np.stack(arrays).astype(np.float32))
        batch = score_batch(model, images, category, args.alpha, generator)
        for j, p in enumerate(chunk):
            amap = batch.anomaly_map[j].numpy()
            panel = side_by_side([to_uint8_image(arrays[j]), overlay(arrays[j], amap)])
            target = save_png(panel, out / names[lo + j])
            print(f"{p}\t{float(batch.image_score[j]):.6f}\t{target}")
    return 0


# ----------------------------------------------------------------------------- model-info
@_errors_to_exit
def _cmd_model_info(args: argparse.Namespace) -> int:
    from diffad_core.nets import model_summary

    cfg = config_from_args(args)
    print(json.dumps(model_summary(cfg), indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------- registration
def register(subparsers: Any) -> None:
    """Add the method's sub-commands to the ``diffad`` parser."""
    p = subparsers.add_parser("train", help="train one category's model (or the unified model)")
    add_config_arguments(p)
    p.add_argument("--category", default=None, help="category to train (per-category mode)")
    p.add_argument("--out", default=None,
                   help="checkpoint folder (default $DIFFAD_HOME/checkpoints/<dataset>/<preset>/<category>)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("score", help="score a category's test split and write the parquet")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or a registered scheme)")
    p.add_argument("--category", default=None, help="category (default: the checkpoint's only one)")
    p.add_argument("--run-dir", default=None, help="results folder (default $DIFFAD_HOME/results/cli-<time>)")
    p.add_argument("--alpha", type=float, default=None, help="override score.alpha")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_score)

    p = subparsers.add_parser("reconstruct", help="gradient-denoising reconstructions as PNG")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or a registered scheme)")
    p.add_argument("--category", default=None, help="category (default: the checkpoint's only one)")
    p.add_argument("--limit", type=int, default=None, help="at most N images (anomalous first)")
    p.add_argument("--out", required=True, help="folder for the input|reconstruction PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_reconstruct)

    p = subparsers.add_parser("evaluate", help="metrics from a run's parquet files only")
    p.add_argument("--run-dir", required=True, help="results/<run_id> folder")
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser("predict", help="anomaly heat-map overlays for image files")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="checkpoint folder, or a registered URI such as "
                        "models:/diffad-<dataset>-<category>@champion")
    p.add_argument("--category", default=None, help="category (default: the checkpoint's only one)")
    p.add_argument("--out", default=None, help="folder for the overlay PNGs (default ./predictions)")
    p.add_argument("--alpha", type=float, default=None, help="override score.alpha")
    p.set_defaults(func=_cmd_predict)

    p = subparsers.add_parser("model-info", help="print the resolved network config and size as JSON")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_model_info)
