"""The ``diffad`` command: one parser, one error path (``main``), sub-commands per area.

Areas: :mod:`.data` (``data ...``), :mod:`.method` (``train``, ``score``, ``reconstruct``,
``evaluate``, ``predict``, ``model-info``) and :mod:`.pipeline` (``benchmark``, ``rerun``,
``registry compare``; offered only when the ``flows`` and ``tasks`` packages are importable).
Nothing heavy (torch, Prefect, MLflow) is imported until a handler runs, so ``diffad --help``
stays fast.

Errors: a user error (a :class:`CliError`, one of our exception classes, ``ConfigError``,
``FileNotFoundError``, ``ValueError``, ``KeyError``, ...) prints one line
``diffad <command>: error: <message>`` and exits 2; anything else is a bug: a short line and a
hint to rerun with ``--debug``, exit 1. ``--debug`` re-raises, so the traceback shows. Ctrl-C: 130.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from diffad_core.cli import data, method
from diffad_core.cli._common import CliError, resolve_checkpoint

__all__ = ["CliError", "build_parser", "main", "pipeline_available", "resolve_checkpoint"]

# Exception classes defined in these packages are ours: their messages are written for users.
_OUR_PACKAGES = ("diffad_core", "tasks", "flows")
_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
    IsADirectoryError, PermissionError,
)  # ValueError covers CliError, ConfigError and UseCaseError


def pipeline_available() -> bool:
    """Whether the pipeline (``flows``, ``tasks``, Prefect, MLflow) is installed; only the empty
    ``flows``/``tasks`` package files are imported to find out."""
    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("flows.benchmark", "tasks.registry", "prefect", "mlflow"))
    except (ModuleNotFoundError, ValueError):  # a parent package is missing / a broken stub
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffad",
        description="Industrial defect localization with diffusion models (Lu et al., ICCV 2023).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (give it before the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data.register(sub)
    method.register(sub)
    if pipeline_available():
        from diffad_core.cli import pipeline

        pipeline.register(sub)
    return parser


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, _USER_ERRORS):
        return True
    return type(exc).__module__.split(".")[0] in _OUR_PACKAGES


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (a multi-line ConfigError is joined)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and not isinstance(exc, CliError):
        key = exc.args[0]
        text = key if isinstance(key, str) and " " in key else f"not found: {key!r}"
    else:
        text = str(exc)
    parts = [line.strip() for line in text.splitlines() if line.strip()]
    if not parts:
        return type(exc).__name__
    out = parts[0]
    for part in parts[1:]:
        out += (" " if out.endswith(":") else "; ") + part
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one ``diffad`` command; return its exit code (argparse usage errors exit 2 itself)."""
    args = build_parser().parse_args(argv)
    name = getattr(args, "command_name", f"diffad {args.command}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if _is_user_error(exc):
            # An error that lists several problems (one per file) prints one line for each.
            for problem in getattr(exc, "problems", None) or []:
                print(f"{name}: {problem}", file=sys.stderr)
            print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"{name}: internal error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        print(f"{name}: this is a bug; run 'diffad --debug {name.removeprefix('diffad ')} ...' "
              "to see the traceback", file=sys.stderr)
        return 1
