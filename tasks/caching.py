"""Cache keys, result storage and retry rules for the Prefect tasks (docs/internals.md "Pipeline").

A trained model is cached by (categories, the hash of the model-defining config, the
dataset manifest hash, the code version, the run date). The code version is the package version plus a hash of the
``diffad_core`` sources, so an edit to the library invalidates the cache even without a commit.
Retries are only for transient failures: bad configs, bad data, out-of-memory and missing files
fail at once.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError
from prefect.cache_policies import NO_CACHE

import diffad_core
from diffad_core.config import ConfigError, DiffadConfig, diffad_home
from diffad_core.data.layouts import DataError
from diffad_core.locks import LockBusy



def result_storage_path() -> Path:
    """Prefect task results live under DIFFAD_HOME so a rerun finds them."""
    path = diffad_home().resolve() / "prefect-results"
    path.mkdir(parents=True, exist_ok=True)
    return path


@lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over the ``diffad_core`` Python sources (path + bytes), 12 hex digits."""
    root = Path(diffad_core.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_version() -> str:
    """``<package version>+<diffad_core source hash>``."""
    try:
        version = metadata.version("diffad")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    return f"{version}+src.{source_hash()}"


def train_key(cfg: DiffadConfig, categories: list[str], manifest_hash: str, date: str | None) -> str:
    """The identity of one training: also the name of its checkpoint directory."""
    blob = json.dumps({
        "categories": sorted(categories), "config": cfg.model_hash(),
        "manifest": manifest_hash, "code": code_version(), "date": date or "",
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn`` for the training task: category (label + list), config hash,
    dataset manifest hash, code version and date. A flow that restores a result whose checkpoint
    has since been deleted reruns the task with ``refresh_cache=True``."""
    cfg: DiffadConfig = parameters["cfg"]
    key = train_key(cfg, parameters["categories"], parameters["manifest_hash"], parameters.get("date"))
    return f"train-{parameters['label']}-{key}"


def _non_transient() -> tuple[type[BaseException], ...]:
    # Configuration errors (ConfigError: a bad key, an unwritable DIFFAD_HOME or MLflow store,
    # an unreachable server found by flows.guard.preflight), a busy run, bad data: a retry only
    # repeats them, slowly (issue #10 item 2).
    return (ConfigError, ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError, NotImplementedError, MemoryError,
            torch.OutOfMemoryError, DataError, UnidentifiedImageError, LockBusy)


def is_transient(exc: BaseException | None) -> bool:
    """True for failures worth retrying (I/O hiccups, a busy server), False for errors that a
    retry cannot fix (bad config or data, OOM, a missing file)."""
    if exc is None:
        return False
    if isinstance(exc, _non_transient()):
        return False
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return False
    return True


def retry_condition(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the state could not even give back its exception
        exc = err
    return is_transient(exc if isinstance(exc, BaseException) else None)


# Task options: retry transient failures only; TRANSIENT_ONLY also never caches the result.
RETRY: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": retry_condition}
TRANSIENT_ONLY: dict[str, Any] = {"cache_policy": NO_CACHE, **RETRY}
