"""Download, verify and safely extract a dataset archive (METHOD.md §1 "Download sources").

* ``download_file``: tries each URL in order; resumable over HTTP Range (a ``.part`` file is
  kept across runs and across retries), a tqdm progress bar, sha256 verified before the file
  takes its final name. A checksum mismatch removes the ``.part``.
* ``safe_extract``: .tar.xz / .tar.gz / .tar.bz2 / .tar / .zip; refuses absolute paths, ``..``,
  links that leave the destination, paths through links, and device or special files.
* ``download_dataset``: an existing folder with categories is used as is (never downloads);
  otherwise download, extract into a temporary folder next to the root, write a marker with
  the archive's sha256, and rename into place atomically.

urllib only.
"""

from __future__ import annotations

import http.client
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from diffad_core._atomic import staging_dir
from diffad_core.config import DownloadSource
from diffad_core.data.layouts import DataError, list_categories
from diffad_core.data.manifest import sha256_file
from diffad_core.progress import progress_bar

MARKER = ".diffad-download.json"
_CHUNK = 1 << 20


class DownloadError(DataError):
    """A download that failed on every URL, or whose checksum does not match."""


class UnsafeArchiveError(DataError):
    """An archive member that would land outside the destination or is not a plain file."""


# ----------------------------------------------------------------------------- download
def _fetch(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    """Fetch ``url`` into ``part``, resuming from its current size when the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "diffad"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return  # nothing left to fetch: the .part is complete (the checksum decides)
        raise
    with response:
        if offset and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-", content_range)
            if not match or int(match.group(1)) != offset:
                raise DownloadError(f"{url}: server answered Range {offset}- with "
                                    f"Content-Range {content_range!r}")
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # the server ignored the Range: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, mode) as fh, progress_bar(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name[:-5], enabled=progress, leave=False) as bar:
            while chunk := response.read(_CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"connection closed after {part.stat().st_size} of {total} bytes")


def download_file(urls: Sequence[str], dest: str | Path, sha256: str | None, *,
                  progress: bool = True, retries: int = 3, timeout: float = 60.0) -> Path:
    """Download to ``dest`` from the first URL that works; verify ``sha256`` (hex).

    Interrupted transfers resume from ``dest.part`` (up to ``retries`` attempts per URL, and
    across calls). Raises ``DownloadError`` listing each URL and why it failed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected = sha256.lower() if sha256 else None
    if dest.is_file() and (expected is None or sha256_file(dest) == expected):
        return dest
    part = dest.with_name(dest.name + ".part")
    errors: list[str] = []
    for url in urls:
        last_error = ""
        fetched = False
        for _attempt in range(max(1, retries)):
            try:
                _fetch(url, part, progress=progress, timeout=timeout)
                fetched = True
                break
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code} {exc.reason}"
                if exc.code < 500:
                    break  # a client error will not go away by retrying
            except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError) as exc:
                reason = getattr(exc, "reason", None) or exc
                last_error = f"{type(exc).__name__}: {reason}"
        if not fetched:
            errors.append(f"{url}: {last_error}")
            continue
        if expected is not None:
            actual = sha256_file(part)
            if actual != expected:
                part.unlink(missing_ok=True)
                errors.append(f"{url}: sha256 mismatch (got {actual}, expected {expected})")
                continue
        os.replace(part, dest)
        return dest
    if not urls:
        errors.append("no URL configured")
    raise DownloadError(f"could not download {dest.name}:\n  " + "\n  ".join(errors))


# ----------------------------------------------------------------------------- extraction
def _unsafe_name(name: str) -> str | None:
    """Why an archive member name is unsafe, or None."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "parent-directory reference '..'"
    return None


def _inside(target: str) -> bool:
    """Whether a posix path relative to the destination stays inside it."""
    norm = posixpath.normpath(target)
    return not (norm == ".." or norm.startswith("../") or norm.startswith("/"))


def _through_link(name: str, links: set[str]) -> bool:
    parts = posixpath.normpath(name).split("/")
    return any("/".join(parts[:i]) in links for i in range(1, len(parts)))


def _check_tar_member(member: tarfile.TarInfo, links: set[str]) -> str | None:
    name = member.name
    reason = _unsafe_name(name)
    if reason:
        return reason
    if _through_link(name, links):
        return "path goes through a link"
    if member.issym():
        if member.linkname.startswith("/") or not _inside(
                posixpath.join(posixpath.dirname(posixpath.normpath(name)), member.linkname)):
            return f"symlink to {member.linkname!r} leaves the destination"
        links.add(posixpath.normpath(name))
    elif member.islnk():
        if member.linkname.startswith("/") or not _inside(member.linkname):
            return f"hard link to {member.linkname!r} leaves the destination"
        links.add(posixpath.normpath(name))
    elif not (member.isfile() or member.isdir()):
        return "device or special file"
    return None


def _extract_tar(archive: Path, dest: Path) -> None:
    links: set[str] = set()
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # streaming: one pass, each member checked before it is written
            reason = _check_tar_member(member, links)
            if reason:
                raise UnsafeArchiveError(f"{archive}: refusing member {member.name!r}: {reason}")
            tar.extract(member, dest, filter="data")


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        links: set[str] = set()
        for info in infos:  # check every member before writing anything
            reason = _unsafe_name(info.filename)
            if reason is None and _through_link(info.filename, links):
                reason = "path goes through a link"
            mode = info.external_attr >> 16
            if reason is None and stat.S_ISLNK(mode):
                target = zf.read(info).decode("utf-8", "replace")
                if target.startswith("/") or not _inside(posixpath.join(
                        posixpath.dirname(posixpath.normpath(info.filename)), target)):
                    reason = f"symlink to {target!r} leaves the destination"
                links.add(posixpath.normpath(info.filename))
            elif reason is None and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                reason = "device or special file"
            if reason:
                raise UnsafeArchiveError(f"{archive}: refusing member {info.filename!r}: {reason}")
        zf.extractall(dest)


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a .tar(.xz|.gz|.bz2) or .zip archive into ``dest`` after checking each member.

    On an unsafe member raises ``UnsafeArchiveError``; the caller extracts into a temporary
    folder and removes it, so nothing is left behind.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, dest)
    else:
        raise DataError(f"{archive}: not a .zip or .tar(.xz|.gz|.bz2) archive")
    return dest


# ----------------------------------------------------------------------------- datasets
def _data_dir(folder: Path, dataset: str, depth: int = 2) -> Path | None:
    """The folder holding the categories: ``folder`` itself or a lone sub-folder of it."""
    if list_categories(folder, dataset):
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if depth > 0 and len(subdirs) == 1:
        return _data_dir(subdirs[0], dataset, depth - 1)
    return None


def read_marker(root: str | Path) -> dict | None:
    """The download marker of a dataset folder, or None."""
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def download_dataset(dataset: str, root: str | Path, source: DownloadSource, *,
                     urls: Sequence[str] | None = None, sha256: str | None = None,
                     progress: bool = True, keep_archive: bool = False,
                     retries: int = 3, timeout: float = 60.0) -> Path:
    """Make ``root`` hold ``dataset``: use an existing folder, else download and extract.

    ``urls``/``sha256`` override the configured source. Returns the root.
    """
    root = Path(root)
    if root.is_dir() and list_categories(root, dataset):
        return root  # present: downloaded earlier (marker) or the user's own copy
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DownloadError(f"{root} exists but holds no {dataset} categories (no sub-folder "
                            f"with train/); point --root at the data or at an empty folder")
    expected = sha256 or source.sha256
    root.parent.mkdir(parents=True, exist_ok=True)
    archive = download_file(list(urls) if urls else source.urls, root.parent / source.filename,
                            expected, progress=progress, retries=retries, timeout=timeout)
    tmp = staging_dir(root.parent, f".{root.name}.extract-")
    try:
        safe_extract(archive, tmp)
        found = _data_dir(tmp, dataset)
        if found is None:
            raise DownloadError(f"{archive}: the archive holds no {dataset} categories")
        (found / MARKER).write_text(json.dumps(
            {"dataset": dataset, "archive": source.filename, "sha256": expected}, indent=1))
        if root.exists():
            root.rmdir()
        os.rename(found, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return root
