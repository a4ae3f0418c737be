"""``diffad data ...``: verify, download, synth, heldout and prepare datasets (no torch at import)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from diffad_core.cli._common import (
    CliError,
    add_category_argument,
    add_config_arguments,
    add_progress_argument,
    command,
    config_from_args,
)
from diffad_core.config import DATASET_KINDS


def register(subparsers: Any) -> None:
    """Add the ``data`` command and its sub-commands."""
    data = subparsers.add_parser("data", help="dataset verify / download / synth / heldout / prepare")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("verify", help="decode every image and mask, count, hash the dataset")
    p.add_argument("--root", required=True, type=Path, help="the dataset folder")
    p.add_argument("--dataset", default="mvtec", choices=DATASET_KINDS)
    add_category_argument(p, "only this category (default: all found)")
    p.add_argument("--manifest-out", type=Path, default=None, metavar="FILE",
                   help="write the manifest (paths, sizes, sha256, hash) as JSON")
    command(p, _verify)

    p = sub.add_parser("download", help="download, verify and extract MVTec-AD or BTAD")
    p.add_argument("--dataset", required=True, choices=("mvtec", "btad"))
    p.add_argument("--root", type=Path, default=None,
                   help="target folder (default: $DIFFAD_HOME/data/<dataset>); an existing "
                        "folder with the categories is used as is")
    p.add_argument("--url", dest="urls", action="append", default=None,
                   help="download from this URL instead of the configured ones (repeatable)")
    p.add_argument("--sha256", default=None, help="expected sha256 of the archive")
    p.add_argument("--keep-archive", action="store_true", help="keep the archive after extracting")
    add_progress_argument(p)
    add_config_arguments(p, default_preset="paper")
    command(p, _download)

    p = sub.add_parser("synth", help="generate the synthetic MVTec-format dataset")
    p.add_argument("--root", required=True, type=Path, help="target folder")
    add_category_argument(p, "only this category (default: weave, gravel, washer, bolt; "
                              "the photo tuning family: moon, tissue, cameraman, retina)")
    _add_generator_arguments(p, defaults=None)
    p.add_argument("--defect-contrast", type=float, default=None, metavar="C",
                   help="blend every test defect in at this fraction of its change, in (0, 1] "
                        "(default 1: as painted; a fainter family for choosing settings)")
    add_progress_argument(p)
    command(p, _synth)

    p = sub.add_parser("heldout", help="generate the held-out benchmark family (real photographs)")
    p.add_argument("--root", required=True, type=Path, help="target folder")
    add_category_argument(p, "only this category (default: brick, grass, coins, coffee)")
    _add_generator_arguments(p, defaults={"size": 256, "seed": 0, "n_train": 60,
                                          "n_test_good": 12, "n_test_per_defect": 6})
    add_progress_argument(p)
    command(p, _heldout)

    p = sub.add_parser("prepare", help="resolve + verify + preprocess every category of a config")
    add_config_arguments(p)
    add_progress_argument(p)
    command(p, _prepare)


def _add_generator_arguments(p: argparse.ArgumentParser, defaults: dict[str, int] | None) -> None:
    """Size, seed and counts of a generated dataset (``defaults`` None: the config's)."""
    for flag, key, what in (("--size", "size", "image side in pixels"), ("--seed", "seed", "seed"),
                            ("--n-train", "n_train", "normal training images per category"),
                            ("--n-test-good", "n_test_good", "normal test images per category"),
                            ("--n-test-per-defect", "n_test_per_defect", "test images per defect")):
        default = None if defaults is None else defaults[key]
        p.add_argument(flag, type=int, default=default, metavar="N",
                       help=what + (f" (default {default})" if default is not None else ""))


def _print_report(report: Any) -> None:
    print(f"dataset {report.dataset} at {report.root}")
    if report.counts:
        print(report.table())
    if report.manifest is not None:
        print(f"manifest: {len(report.manifest['files'])} files, hash {report.manifest['hash']}")
    for problem in report.problems:
        print(problem, file=sys.stderr)
    if report.problems:
        print(f"{len(report.problems)} problem(s) found", file=sys.stderr)


def _verify(args: argparse.Namespace) -> int:
    """Exit 0 when the dataset is clean, 1 when problems were found (listed on stderr)."""
    from diffad_core.data.verify import verify_dataset

    report = verify_dataset(args.root, args.dataset, args.categories)
    _print_report(report)
    if args.manifest_out is not None and report.manifest is not None:
        args.manifest_out.parent.mkdir(parents=True, exist_ok=True)
        args.manifest_out.write_text(json.dumps(
            {"root": str(report.root), "dataset": report.dataset,
             "categories": report.categories, **report.manifest}, indent=1))
        print(f"manifest written to {args.manifest_out}")
    return 1 if report.problems else 0


def _download(args: argparse.Namespace) -> int:
    from diffad_core.data.download import download_dataset, read_marker
    from diffad_core.data.layouts import list_categories

    cfg = config_from_args(args)
    root = args.root if args.root is not None else (
        cfg.data.resolved_root() if cfg.data.dataset == args.dataset
        else cfg.data.resolved_root().parent / args.dataset)
    source = cfg.data.sources.get(args.dataset)
    if source is None:
        raise CliError(f"no download source for {args.dataset!r} in data.sources")
    if root.is_dir() and list_categories(root, args.dataset):
        marker = read_marker(root)
        if marker:
            print(f"{root}: already downloaded and verified (sha256 {marker.get('sha256')})")
        else:
            print(f"{root}: existing {args.dataset} folder used as is (not downloaded)")
        return 0
    download_dataset(args.dataset, root, source, urls=args.urls, sha256=args.sha256,
                     progress=args.progress, keep_archive=args.keep_archive)
    print(f"{args.dataset} extracted to {root}: {', '.join(list_categories(root, args.dataset))}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from diffad_core.config import SynthConfig
    from diffad_core.data.synth import generate_dataset

    fields = {"categories": args.categories, "size": args.size, "seed": args.seed,
              "n_train": args.n_train, "n_test_good": args.n_test_good,
              "n_test_per_defect": args.n_test_per_defect, "defect_contrast": args.defect_contrast}
    synth_cfg = SynthConfig(**{k: v for k, v in fields.items() if v is not None})
    root = generate_dataset(args.root, synth_cfg, progress=args.progress)
    print(f"synthetic dataset written to {root}")
    return 0


def _heldout(args: argparse.Namespace) -> int:
    from diffad_core.data.heldout import generate_heldout

    root = generate_heldout(args.root, seed=args.seed, size=args.size, n_train=args.n_train,
                            n_test_good=args.n_test_good, n_test_per_defect=args.n_test_per_defect,
                            categories=args.categories, progress=args.progress)
    print(f"held-out dataset written to {root}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    """Exit 1 when verification finds problems (listed on stderr)."""
    from diffad_core.data.prepare import cache_path, prepare_split, resolve_dataset
    from diffad_core.data.verify import verify_dataset

    cfg = config_from_args(args)
    root = resolve_dataset(cfg, progress=args.progress)
    report = verify_dataset(root, cfg.data.dataset, cfg.categories())
    _print_report(report)
    if report.problems:
        return 1
    for category in cfg.categories():
        for split in ("train", "test"):
            prepared = prepare_split(cfg, category, split)
            where = cache_path(prepared.manifest_hash, cfg.data.image_size, split)
            print(f"{category} {split}: {len(prepared)} images at {cfg.data.image_size}px"
                  + (f" -> {where}" if cfg.data.cache else ""))
    return 0
