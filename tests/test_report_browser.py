"""report.html in a real browser: headless Chromium (Debian's ``chromium``) opens the report
through the DevTools protocol, and the test checks that every figure decodes at its PNG's size,
that every table is laid out with its rows, and keeps a full-page screenshot in the test's
temporary folder. Skips with the reason where no Chromium is installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from diffad_core import report as Rep
from diffad_core import results as R
from tests.results_helpers import make_records

pytestmark = pytest.mark.integration  # starts a browser process on 127.0.0.1

CATEGORIES = ["weave", "gravel"]
_BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# What the page shows, read in the page itself after it loaded.
_PAGE_STATE = """JSON.stringify({
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
    width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().height})),
  tables: Array.from(document.querySelectorAll('table')).map(t => ({
    rows: t.tBodies.length ? t.tBodies[0].rows.length : 0, shown: t.getBoundingClientRect().height,
    text: t.innerText})),
})"""


def _browser() -> str:
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium installed (apt-get install chromium; .ci/run installs it)")


class _Page:
    """One page of a headless browser, driven over the DevTools protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws, self._id = ws, 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=60))
            if msg.get("id") == self._id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        while json.loads(self._ws.recv(timeout=60)).get("method") != "Page.loadEventFired":
            pass

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"]["value"]


@pytest.fixture()
def page(tmp_path: Path) -> Iterator[_Page]:
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([_browser(), "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--no-first-run", "--remote-debugging-address=127.0.0.1",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "--window-size=1280,1000", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"  # written once the browser listens
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as resp:
            target = next(t for t in json.load(resp) if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            yield _Page(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture()
def report(tmp_path: Path) -> dict[str, Any]:
    run_dir = tmp_path / "results" / "run-1"
    for i, cat in enumerate(CATEGORIES):
        recs = make_records(cat, size=32, seed=i, kinds=("hole", "stain"))
        rng = np.random.default_rng(i)
        inputs = {r.rel_path: (rng.random((32, 32, 3)) * 255).astype(np.uint8) for r in recs}
        R.write_scores(run_dir, cat, recs, "v1", alpha=0.5, alpha_source="config",
                       input_images=inputs, reconstructions=inputs)
    R.evaluate_run(run_dir, {}, categories=CATEGORIES)
    return Rep.build_report(run_dir, tmp_path / "report", dataset="synthetic", title="Browser check")


def test_report_html_in_headless_chromium(page: _Page, report: dict[str, Any], tmp_path: Path) -> None:
    page.open(report["html"].as_uri())
    state = json.loads(page.evaluate(_PAGE_STATE))

    # Every figure decoded by the browser, at the size of the PNG the report embedded, and shown.
    sizes = {cat: Image.open(path).size for cat, path in report["figures"].items()}
    assert set(sizes) == set(CATEGORIES)
    assert {img["alt"]: (img["width"], img["height"]) for img in state["images"]} == sizes
    assert all(img["complete"] and img["shown"] > 0 for img in state["images"])
    # Every table laid out with rows; the results table names each category.
    n_tables = report["html"].read_text().count("<table>")
    assert len(state["tables"]) == n_tables >= 3
    assert all(t["rows"] > 0 and t["shown"] > 0 for t in state["tables"])
    assert all(cat in state["tables"][0]["text"] for cat in CATEGORIES)

    shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 1000 and pixels.std() > 10  # the whole page, not a blank one
