"""Download (resumable, verified) and safe extraction, against a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from data_builders import build_btad, build_mvtec

from diffad_core.cli import main
from diffad_core.config import DownloadSource
from diffad_core.data import (
    DownloadError,
    UnsafeArchiveError,
    download_dataset,
    download_file,
    list_categories,
    safe_extract,
)
from diffad_core.data.download import MARKER

pytestmark = pytest.mark.integration


class _FileServer:
    """Serves ``files`` on 127.0.0.1 with HTTP Range; ``cut_once`` paths drop mid-body once."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_error(416, "Range Not Satisfiable")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if self.path in server.cut_once:
                    server.cut_once.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[_FileServer]:
    srv = _FileServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _tar_gz(folder: Path, arcroot: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            tar.add(path, arcname=f"{arcroot}/{rel}" if arcroot else rel, recursive=False)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source(name: str, data: bytes, urls: list[str]) -> DownloadSource:
    return DownloadSource(filename=name, urls=urls, sha256=_sha(data))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name or ".extract-" in p.name)


def test_download_extract_then_noop(server: _FileServer, tmp_path: Path) -> None:
    archive = _tar_gz(build_mvtec(tmp_path / "src"))  # categories at the top, as MVTec ships
    server.files["/mvtec.tar.gz"] = archive
    dest = tmp_path / "data" / "mvtec"
    src = _source("mvtec.tar.gz", archive, [server.url("/missing.tar.gz"), server.url("/mvtec.tar.gz")])
    assert download_dataset("mvtec", dest, src, progress=False) == dest
    assert list_categories(dest, "mvtec") == ["bottle", "grid"]
    assert (dest / "bottle/ground_truth/crack/000_mask.png").is_file()
    assert f'"sha256": "{_sha(archive)}"' in (dest / MARKER).read_text()
    assert _leftovers(dest.parent) == [] and not (dest.parent / "mvtec.tar.gz").exists()
    n = len(server.requests)
    download_dataset("mvtec", dest, src, progress=False)  # present: no request at all
    assert len(server.requests) == n


def test_btad_zip_with_wrapping_folder(server: _FileServer, tmp_path: Path) -> None:
    src_root = build_btad(tmp_path / "src")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(src_root.rglob("*")):
            if path.is_file():
                zf.write(path, f"BTech_Dataset_transformed/{path.relative_to(src_root).as_posix()}")
    server.files["/btad.zip"] = buf.getvalue()
    dest = tmp_path / "btad"
    download_dataset("btad", dest, _source("btad.zip", buf.getvalue(), [server.url("/btad.zip")]),
                     progress=False)
    assert list_categories(dest, "btad") == ["01", "03"]


def test_interrupted_download_resumes_in_the_same_call(server: _FileServer, tmp_path: Path) -> None:
    data = bytes(range(256)) * 64
    server.files["/f.bin"] = data
    server.cut_once.add("/f.bin")
    out = download_file([server.url("/f.bin")], tmp_path / "f.bin", _sha(data), progress=False)
    assert out.read_bytes() == data and not (tmp_path / "f.bin.part").exists()
    assert server.requests == [("/f.bin", None), ("/f.bin", f"bytes={len(data) // 2}-")]


def test_interrupted_download_resumes_across_runs(server: _FileServer, tmp_path: Path) -> None:
    data = b"0123456789abcdef" * 100
    server.files["/f.bin"] = data
    server.cut_once.add("/f.bin")
    with pytest.raises(DownloadError, match=r"f.bin: .*connection closed after 800 of 1600 bytes"):
        download_file([server.url("/f.bin")], tmp_path / "f.bin", _sha(data), progress=False,
                      retries=1)
    assert (tmp_path / "f.bin.part").stat().st_size == 800  # kept for the next run
    download_file([server.url("/f.bin")], tmp_path / "f.bin", _sha(data), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.requests[-1] == ("/f.bin", "bytes=800-")


def test_bad_checksum_leaves_nothing(server: _FileServer, tmp_path: Path) -> None:
    archive = _tar_gz(build_mvtec(tmp_path / "src"))
    server.files["/m.tar.gz"] = archive
    dest = tmp_path / "data" / "mvtec"
    src = DownloadSource(filename="m.tar.gz", urls=[server.url("/m.tar.gz")], sha256="0" * 64)
    with pytest.raises(DownloadError) as err:
        download_dataset("mvtec", dest, src, progress=False)
    msg = str(err.value)
    assert server.url("/m.tar.gz") in msg and f"sha256 mismatch (got {_sha(archive)}" in msg
    assert not dest.exists() and list((tmp_path / "data").iterdir()) == []


def test_every_url_failing_is_listed(server: _FileServer, tmp_path: Path) -> None:
    urls = [server.url("/gone.zip"), "http://127.0.0.1:9/refused.zip"]
    with pytest.raises(DownloadError) as err:
        download_file(urls, tmp_path / "x.zip", "0" * 64, progress=False, retries=1, timeout=5)
    lines = str(err.value).splitlines()
    assert lines[0] == "could not download x.zip:"
    assert lines[1] == f"  {urls[0]}: HTTP 404 Not Found"
    assert lines[2].startswith(f"  {urls[1]}: ") and "refused" in lines[2].lower()


def test_existing_folder_is_used_without_downloading(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = build_mvtec(tmp_path / "mine")
    unreachable = DownloadSource(filename="m.tar.xz", urls=["http://127.0.0.1:9/m"], sha256="0" * 64)
    assert download_dataset("mvtec", root, unreachable, progress=False) == root
    assert main(["data", "download", "--dataset", "mvtec", "--root", str(root),
                 "--url", "http://127.0.0.1:9/m"]) == 0
    assert "existing mvtec folder used as is" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DownloadError, match="holds no mvtec categories"):
        download_dataset("mvtec", tmp_path / "other", unreachable, progress=False)


def test_cli_download(server: _FileServer, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    archive = _tar_gz(build_mvtec(tmp_path / "src", categories=("wood",)))
    server.files["/a.tar.gz"] = archive
    root = tmp_path / "mv"
    args = ["data", "download", "--dataset", "mvtec", "--root", str(root), "--url",
            server.url("/a.tar.gz"), "--no-progress"]
    assert main([*args, "--sha256", "f" * 64]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert main([*args, "--sha256", _sha(archive)]) == 0
    assert "extracted to" in capsys.readouterr().out
    assert main([*args, "--sha256", _sha(archive)]) == 0
    assert "already downloaded and verified" in capsys.readouterr().out


def _evil_tar(kind: str, outside: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, payload: bytes = b"x", **attrs: object) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload) if not attrs else 0
            for k, v in attrs.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(payload) if not attrs else None)

        add("cat/train/good/000.png")  # a harmless member first: it must not survive either
        if kind == "dotdot":
            add("../evil.txt")
        elif kind == "absolute":
            add(str(outside / "evil_abs.txt"))
        elif kind == "symlink":
            add("cat/link", type=tarfile.SYMTYPE, linkname="../../..")
            add("cat/link/evil.txt")
        elif kind == "chain":
            add("cat/here", type=tarfile.SYMTYPE, linkname=".")
            add("cat/here/up", type=tarfile.SYMTYPE, linkname="..")
        elif kind == "hardlink":
            add("cat/passwd", type=tarfile.LNKTYPE, linkname="../../etc/passwd")
        elif kind == "device":
            add("cat/null", type=tarfile.CHRTYPE)
    return buf.getvalue()


@pytest.mark.parametrize("kind,reason", [
    ("dotdot", "parent-directory reference"),
    ("absolute", "absolute path"),
    ("symlink", "symlink to '../../..' leaves the destination"),
    ("chain", "path goes through a link"),
    ("hardlink", "hard link to '../../etc/passwd' leaves the destination"),
    ("device", "device or special file"),
])
def test_malicious_tar_is_refused(kind: str, reason: str, server: _FileServer,
                                  tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    data = _evil_tar(kind, outside)
    server.files["/evil.tar"] = data
    parent = tmp_path / "data"
    with pytest.raises(UnsafeArchiveError, match=re.escape(reason)):
        download_dataset("mvtec", parent / "mvtec", _source("evil.tar", data,
                                                           [server.url("/evil.tar")]),
                         progress=False)
    assert not (parent / "mvtec").exists()
    assert sorted(p.name for p in parent.iterdir()) == ["evil.tar"]  # only the archive
    assert list(outside.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_malicious_zip_is_refused_before_writing(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cat/train/good/000.png", b"x")
        zf.writestr("cat/../../evil.txt", b"x")
    (tmp_path / "e.zip").write_bytes(buf.getvalue())
    dest = tmp_path / "a" / "b"
    with pytest.raises(UnsafeArchiveError, match="cat/../../evil.txt"):
        safe_extract(tmp_path / "e.zip", dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "evil.txt").exists()
