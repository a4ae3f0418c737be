"""The ``diffad`` command.

Each area registers its own sub-commands: the data layer (``data ...``), the method
(``train``, ``score``, ``reconstruct``, ``evaluate``, ``predict``, ``model-info``) and the
pipeline (``benchmark``, ``registry ...``, ``rerun``). The pipeline commands live in
``flows`` and are imported only when present, so ``diffad_core`` stays free of Prefect/MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffad_core.config import ConfigError

_COMMAND_MODULES = (
    "diffad_core.data._commands",
    "diffad_core._commands",
    "flows._commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffad",
        description="Industrial defect localization with diffusion models (Lu et al., ICCV 2023).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"diffad: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffad: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
