"""Arguments shared by the sub-commands that take a configuration."""

from __future__ import annotations

import argparse

from diffad_core.config import PRESETS, DiffadConfig, load_config


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str = "cpu-demo") -> None:
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                        help=f"named preset (default {default_preset})")
    parser.add_argument("--config", dest="config_file", default=None,
                        help="YAML file with overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one key, e.g. --set train.iterations=100")


def config_from_args(args: argparse.Namespace) -> DiffadConfig:
    return load_config(args.preset, args.config_file, args.overrides)
