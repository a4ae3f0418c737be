"""Arguments, errors and checkpoint specs shared by every ``diffad`` sub-command."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffad_core.config import PRESETS, DiffadConfig, load_config

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(.*)$")
_CHECKPOINT_FILES = ("model.safetensors", "config.json")

Handler = Callable[[argparse.Namespace], int]


class CliError(ValueError):
    """A user error the CLI reports as one line (``diffad <command>: error: ...``), exit code 2."""


# ----------------------------------------------------------------------------- arguments
def command(parser: argparse.ArgumentParser, handler: Handler) -> argparse.ArgumentParser:
    """Attach ``handler`` to a leaf parser; ``parser.prog`` (``diffad data verify``) names the
    command in error messages."""
    parser.set_defaults(func=handler, command_name=parser.prog)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str | None = "cpu-demo") -> None:
    """``--preset``, ``--config FILE`` and ``--set KEY=VALUE`` (repeatable). A None default is
    decided by the command (``benchmark``: ``cpu`` for ``--dataset folder``, else ``cpu-demo``)."""
    shown = default_preset or "cpu for --dataset folder, else cpu-demo"
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                        help=f"named preset (default {shown})")
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                        help="YAML file with overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one key, e.g. --set train.iterations=100")


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> DiffadConfig:
    """Defaults, preset, ``--config``, ``extra`` (values from the command's own flags), ``--set``."""
    return load_config(args.preset, args.config_file, list(args.overrides), extra=extra or None)


def add_category_argument(parser: argparse.ArgumentParser, help: str) -> None:  # noqa: A002
    """``--category C``, repeatable, into ``args.categories`` (None when not given)."""
    parser.add_argument("--category", dest="categories", action="append", default=None,
                        metavar="C", help=f"{help} (repeatable)")


def one_category(args: argparse.Namespace) -> str | None:
    """The single ``--category`` of a one-category command (None when not given)."""
    cats = list(args.categories or [])
    if len(cats) > 1:
        raise CliError(f"this command takes one --category, got {len(cats)}: {', '.join(cats)}")
    return cats[0] if cats else None


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars (``args.progress`` False)."""
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")


# ----------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(spec: str | Path) -> Path:
    """A checkpoint spec -> a local folder holding ``model.safetensors`` and ``config.json``.

    A local folder or ``file:`` URL is checked directly; ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>`` is fetched from the MLflow registry by
    ``tasks.registry.resolve_models_uri`` (imported here, only for such specs). Any other
    scheme, or a folder that is not a checkpoint, is a :class:`CliError`.
    """
    text = str(spec)
    match = _SCHEME.match(text)
    # Single letters are Windows drive letters, not schemes; an existing path wins over a scheme.
    if match and len(match.group(1)) > 1 and not Path(text).exists():
        scheme = match.group(1).lower()
        if scheme == "file":
            path = Path(re.sub(r"^/+", "/", match.group(2)))
        elif scheme == "models":
            path = _from_registry(text)
        else:
            raise CliError(f"cannot resolve checkpoint {text!r}: unknown scheme '{scheme}:' "
                           "(use a local checkpoint folder, file:PATH or models:/NAME@ALIAS)")
    else:
        path = Path(text).expanduser()
    if not path.exists():
        raise CliError(f"checkpoint {text!r}: folder {path} does not exist")
    if not path.is_dir():
        raise CliError(f"checkpoint {text!r}: {path} is not a folder")
    for name in _CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise CliError(f"checkpoint {text!r}: {path / name} is missing (not a diffad checkpoint?)")
    return path


def _from_registry(uri: str) -> Path:
    try:
        from tasks.registry import resolve_models_uri
        from tasks.tracking import local_store_file, tracking_uri
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("tasks", "mlflow"):
            raise
        raise CliError(f"cannot resolve {uri!r}: the pipeline packages (tasks, MLflow) are not "
                       f"installed ({exc})") from exc
    db = local_store_file()
    if db is not None and not db.is_file():  # MLflow would create an empty store to look in
        raise CliError(f"cannot resolve {uri!r}: no MLflow store at {db} ({tracking_uri()}); "
                       "nothing was registered under this DIFFAD_HOME (or set MLFLOW_TRACKING_URI)")
    return Path(resolve_models_uri(uri))
