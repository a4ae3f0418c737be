"""The dataset manifest: every image and mask of some categories with its size and sha256.

The manifest's hash identifies the data a model was trained and scored on (an MLflow tag, the
preprocessing cache key). Content hashes are cached on disk under
``$DIFFAD_HOME/cache/sha256/`` keyed by (absolute path, size, mtime), so repeated runs only
``stat`` the files.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from diffad_core._atomic import atomic_write_text
from diffad_core.config import diffad_home
from diffad_core.data.layouts import list_samples

_CHUNK = 1 << 20
_LOCK = threading.Lock()


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _HashCache:
    """sha256 of files keyed by (path, size, mtime_ns), persisted per dataset root."""

    def __init__(self, root: Path) -> None:
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        self.file = diffad_home() / "cache" / "sha256" / f"{key}.json"
        self.entries: dict[str, list[Any]] = {}
        self.dirty = False
        try:
            loaded = json.loads(self.file.read_text())
            if isinstance(loaded, dict):
                self.entries = loaded
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, path: Path) -> tuple[int, str]:
        st = path.stat()
        key = str(path.resolve())
        hit = self.entries.get(key)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return st.st_size, hit[2]
        digest = sha256_file(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return st.st_size, digest

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            atomic_write_text(self.file, json.dumps(self.entries, sort_keys=True))
        except OSError:
            pass  # the cache is an optimisation only; a read-only home just hashes again
        self.dirty = False


def manifest_hash(files: list[dict[str, Any]]) -> str:
    """The hash of a manifest's file list (relative path, size, sha256), order-independent."""
    canon = sorted((f["path"], int(f["size"]), f["sha256"]) for f in files)
    blob = json.dumps(canon, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def dataset_manifest(root: str | Path, dataset: str, categories: list[str]) -> dict[str, Any]:
    """``{"files": [{"path", "size", "sha256"}...], "hash": str}`` for the images and masks of
    ``categories`` under ``root`` (paths relative to ``root``, posix, sorted)."""
    root = Path(root)
    paths: set[Path] = set()
    for category in categories:
        for sample in list_samples(root, dataset, category):
            paths.add(sample.image_path)
            if sample.mask_path is not None:
                paths.add(sample.mask_path)
    with _LOCK:
        cache = _HashCache(root)
        files = []
        for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
            size, digest = cache.sha256(path)
            files.append({"path": path.relative_to(root).as_posix(), "size": size,
                          "sha256": digest})
        cache.save()
    return {"files": files, "hash": manifest_hash(files)}
