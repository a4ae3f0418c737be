"""What produced a result: git SHA, library versions, config and data hashes, machine (the MLflow
tags of docs/internals.md "Pipeline"). A plain library: it never imports mlflow or prefect (their versions come from
``importlib.metadata``)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

# distribution names whose versions are recorded (those not installed are left out)
TRACKED_DISTRIBUTIONS: tuple[str, ...] = (
    "torch", "torchvision", "timm", "numpy", "pandas", "pyarrow", "scikit-image", "scipy",
    "safetensors", "pydantic", "prefect", "mlflow", "diffad",
)


def _git(path: str | Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_sha(path: str | Path = ".") -> str | None:
    """The commit SHA of the git work tree holding ``path``; None outside git or without git."""
    sha = _git(path, "rev-parse", "HEAD")
    return sha or None


def git_dirty(path: str | Path = ".") -> bool | None:
    """True if tracked files differ from HEAD (untracked files are ignored); None outside git."""
    if git_sha(path) is None:
        return None
    status = _git(path, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def git_info(path: str | Path = ".") -> dict[str, Any]:
    """``{"sha": str | None, "dirty": bool | None}``."""
    return {"sha": git_sha(path), "dirty": git_dirty(path)}


def library_versions() -> dict[str, str]:
    """Python and the installed versions of the libraries that shape the numbers."""
    out = {"python": platform.python_version()}
    for dist in TRACKED_DISTRIBUTIONS:
        try:
            out[dist] = _md.version(dist)
        except _md.PackageNotFoundError:
            continue
    return out


def device_info() -> dict[str, Any]:
    """CPU/GPU description: platform, CPU count, and the CUDA devices torch sees (if any)."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "cuda_available": False}
    try:
        import torch
    except ImportError:
        return info
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["cuda_available"] = True
        info["cuda_version"] = torch.version.cuda
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_name"] = info["cuda_devices"][0]
    return info


def run_provenance(cfg: Any, manifest_hash: str | None, *, repo_path: str | Path | None = None
                   ) -> dict[str, Any]:
    """Everything needed to say what produced a run.

    ``cfg``: a ``DiffadConfig`` (or any object with ``to_dict()`` and ``config_hash()``, or a plain
    dict). ``repo_path``: where to look for git (default: this package's source tree).
    """
    if hasattr(cfg, "to_dict"):
        resolved = cfg.to_dict()
        cfg_hash = cfg.config_hash()
    elif isinstance(cfg, dict):
        from diffad_core.config import config_from_dict

        built = config_from_dict(cfg)
        resolved, cfg_hash = built.to_dict(), built.config_hash()
    else:
        raise TypeError(f"run_provenance: cfg must be a DiffadConfig or dict, got {type(cfg).__name__}")
    repo = Path(repo_path) if repo_path is not None else Path(__file__).resolve().parent
    git = git_info(repo)
    return {
        "seed": resolved.get("seed"),
        "preset": resolved.get("preset"),
        "config_hash": cfg_hash,
        "config": resolved,
        "git_sha": git["sha"],
        "git_dirty": git["dirty"],
        "manifest_hash": manifest_hash,
        "versions": library_versions(),
        "hostname": socket.gethostname(),
        "device": device_info(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def provenance_tags(prov: dict[str, Any]) -> dict[str, str]:
    """A flat ``{str: str}`` view of :func:`run_provenance` for tracking-server tags (no config)."""
    tags = {
        "git_sha": str(prov.get("git_sha") or "unknown"),
        "git_dirty": str(prov.get("git_dirty")),
        "config_hash": str(prov.get("config_hash")),
        "manifest_hash": str(prov.get("manifest_hash")),
        "seed": str(prov.get("seed")),
        "preset": str(prov.get("preset")),
        "hostname": str(prov.get("hostname")),
        "timestamp_utc": str(prov.get("timestamp_utc")),
    }
    device = prov.get("device") or {}
    tags["device"] = str(device.get("cuda_name") or "cpu")
    for name, version in (prov.get("versions") or {}).items():
        tags[f"version.{name}"] = str(version)
    return tags
