"""Fetching and verifying the ADM init checkpoint, against a local HTTP server (METHOD.md §2)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from diffad_core.config import TrainConfig, load_config
from diffad_core.nets import ADM_SOURCES, AdmInitError, prepare_init_checkpoint

pytestmark = pytest.mark.integration

BODY = b"not really 2.1 GB of ADM weights\n" * 100
SHA = hashlib.sha256(BODY).hexdigest()
NAME = ADM_SOURCES["openai-adm-256"].filename


class _Server:
    """Serves ``files`` on 127.0.0.1 and records the paths asked for."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    srv.files["/adm/" + NAME] = BODY
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIFFAD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _train(server: _Server, **update) -> TrainConfig:
    return TrainConfig(init_urls=[server.url("/missing.pt"), server.url("/adm/" + NAME)], **update)


def test_defaults_per_preset():
    assert load_config("paper").train.init_checkpoint == "openai-adm-256"
    assert load_config("unified").train.init_checkpoint == "openai-adm-256"
    assert load_config("cpu-demo").train.init_checkpoint is None
    assert load_config("smoke").train.init_checkpoint is None
    assert prepare_init_checkpoint(load_config("smoke")) is None
    assert ADM_SOURCES["openai-adm-256"].urls == (
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion.pt",)


def test_download_records_the_hash_once(server, home):
    first = prepare_init_checkpoint(_train(server), progress=False)
    assert first is not None and first.downloaded and first.source == "openai-adm-256"
    assert first.path == home / "weights" / NAME and first.path.read_bytes() == BODY
    assert first.sha256 == SHA
    sidecar = json.loads((home / "weights" / (NAME + ".json")).read_text())
    assert sidecar["sha256"] == SHA and sidecar["size_bytes"] == len(BODY)
    assert server.requests == ["/missing.pt", "/adm/" + NAME]  # the first mirror 404s

    again = prepare_init_checkpoint(load_config("paper", overrides=[
        f"train.init_urls=[{server.url('/adm/' + NAME)}]", f"train.init_sha256={SHA.upper()}"]),
        progress=False)
    assert again is not None and not again.downloaded and again.sha256 == SHA
    assert len(server.requests) == 2  # nothing fetched the second time
    assert again.to_dict()["path"] == str(first.path)


def test_pinned_hash_that_differs_is_an_error(server, home):
    wrong = "0" * 64
    with pytest.raises(AdmInitError) as err:  # at download time: nothing is kept
        prepare_init_checkpoint(_train(server, init_sha256=wrong), progress=False)
    msg = str(err.value)
    assert NAME in msg and SHA in msg and wrong in msg
    assert not (home / "weights" / NAME).exists()

    prepare_init_checkpoint(_train(server), progress=False)  # now fetched, unpinned
    with pytest.raises(AdmInitError) as err:  # an existing file that differs
        prepare_init_checkpoint(_train(server, init_sha256=wrong), progress=False)
    msg = str(err.value)
    assert str(home / "weights" / NAME) in msg and SHA in msg and wrong in msg


def test_a_changed_file_is_hashed_again(server, home):
    first = prepare_init_checkpoint(_train(server), progress=False)
    assert first is not None
    first.path.write_bytes(BODY + b"x")
    second = prepare_init_checkpoint(_train(server), progress=False)
    assert second is not None and second.sha256 == hashlib.sha256(BODY + b"x").hexdigest()


def test_offline_never_downloads(server, home):
    with pytest.raises(AdmInitError, match=r"init_offline.*256x256_diffusion\.pt"):
        prepare_init_checkpoint(_train(server, init_offline=True), progress=False)
    assert server.requests == []
    (home / "weights").mkdir(parents=True)
    (home / "weights" / NAME).write_bytes(BODY)
    got = prepare_init_checkpoint(_train(server, init_offline=True, init_sha256=SHA), progress=False)
    assert got is not None and got.sha256 == SHA and not got.downloaded
    assert server.requests == []


def test_local_files_and_unknown_names(tmp_path, home):
    path = tmp_path / "mine.pt"
    path.write_bytes(BODY)
    got = prepare_init_checkpoint(TrainConfig(init_checkpoint=str(path)), progress=False)
    assert got is not None and got.source == "file" and got.sha256 == SHA and got.path == path
    with pytest.raises(AdmInitError, match="does not match train.init_sha256"):
        prepare_init_checkpoint(TrainConfig(init_checkpoint=str(path), init_sha256="1" * 64))
    with pytest.raises(AdmInitError, match="neither a named source"):
        prepare_init_checkpoint(TrainConfig(init_checkpoint=str(tmp_path / "nope.pt")))


def test_all_urls_failing_names_them(server, home):
    cfg = TrainConfig(init_urls=[server.url("/a.pt"), server.url("/b.pt")])
    with pytest.raises(AdmInitError, match=r"(?s)/a\.pt.*404.*/b\.pt.*404"):
        prepare_init_checkpoint(cfg, progress=False)
