"""Registered versions are MLflow pyfunc models (issue #12): ``mlflow.pyfunc.load_model`` on
``models:/...@champion`` gives the same scores and maps as ``diffad predict`` on the same
checkpoint, without the training data; ``mlflow models serve`` serves it on 127.0.0.1.

One smoke checkpoint (with map calibration and the whitened feature residual, so the stored
calibration and its weights are exercised), registered
once for the module in a temporary MLflow store.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffad_core.cli import main
from diffad_core.config import load_config
from diffad_core.overlay import overlay, side_by_side, to_uint8_image
from diffad_core.usecases import load_for_evaluation, predict_images
from tasks import pyfunc_model, registry, tracking

TRAIN = ["--preset", "smoke", "--set", "data.categories=[weave]", "--set", "data.synth.categories=[weave]",
         "--set", "score.calibrate_maps=true", "--set", "score.validation_fraction=0.34",
         "--set", "score.feature_whitening=full"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A trained smoke checkpoint of weave, registered as champion; the store's URI in the
    environment (as a user of mlflow.pyfunc / mlflow models serve sets it)."""
    root = tmp_path_factory.mktemp("pyfunc")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFAD_HOME", str(root / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'store' / 'mlflow.db'}")
        (root / "store").mkdir()
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["train", *TRAIN, "--category", "weave", "--no-progress"]) == 0
        checkpoint = Path(json.loads(out.getvalue().strip().splitlines()[-1])["checkpoint_dir"])
        cfg = load_config("smoke")
        run = tracking.start_run(cfg, "weave", {})
        name = registry.model_name(cfg, "weave")
        version = registry.register_checkpoint(run, checkpoint, name, {"pro": 0.5, "pixel_auroc": 0.5},
                                               tags={registry.TEST_MANIFEST_TAG: "x"})
        assert registry.promote(name, version, tolerance=0.0).promoted
        images = sorted((root / "home" / "data" / "synthetic" / "weave" / "test").glob("*/*.png"))[:5]
        assert len(images) == 5  # more than score.batch_size (4): noise is drawn across batches
        yield {"checkpoint": checkpoint, "uri": f"models:/{name}@champion", "images": images,
               "root": root, "store": os.environ["MLFLOW_TRACKING_URI"]}


def test_load_model_predicts_like_diffad_predict(registered: dict[str, Any], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    images: list[Path] = registered["images"]
    expected = predict_images(load_for_evaluation(registered["checkpoint"]), "weave", images)

    # diffad predict on the registered version prints the same scores and draws the same maps.
    out = tmp_path / "pred"
    assert main(["predict", *map(str, images), "--checkpoint", registered["uri"], "--out", str(out)]) == 0
    lines = [ln.split("\t") for ln in capsys.readouterr().out.splitlines() if ln.count("\t") == 2]
    assert [ln[1] for ln in lines] == [f"{s:.6f}" for s in expected.image_scores]
    for j, (_, _, png) in enumerate(lines):
        drawn = side_by_side([to_uint8_image(expected.images[j]),
                              overlay(expected.images[j], expected.anomaly_maps[j])])
        assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), drawn)

    # The MLflow model, without the training data (it carries the recorded map calibration).
    pngs = [p.read_bytes() for p in images]
    data = registered["root"] / "home" / "data"
    data.rename(data.with_name("data-away"))
    try:
        model = mlflow.pyfunc.load_model(registered["uri"])
        got = model.predict(pd.DataFrame({"image": pngs}))
        with_alpha = model.predict(pd.DataFrame({"image": pngs[:1]}),
                                   params={"alpha": 0.25, "category": "weave"})
    finally:
        data.with_name("data-away").rename(data)
    assert np.array_equal(got["image_score"], expected.image_scores)
    assert np.array_equal(got["anomaly_map"], expected.anomaly_maps)
    assert got["anomaly_map"].shape == (5, 32, 32) and got["anomaly_map"].dtype == np.float32
    one = predict_images(load_for_evaluation(registered["checkpoint"]), "weave", images[:1], alpha=0.25)
    assert np.array_equal(with_alpha["image_score"], one.image_scores)

    meta = model.metadata
    assert meta.signature.inputs.input_names() == ["image"]
    assert {p.name for p in meta.signature.params.params} == {"category", "alpha"}
    assert meta.model_id is not None
    model_dir = Path(mlflow.artifacts.download_artifacts(registered["uri"]))
    requirements = (model_dir / "requirements.txt").read_text()
    assert "diffad" not in requirements and "torch==2.14.1" in requirements  # its code is inside
    assert (model_dir / "code" / "diffad_core" / "score.py").is_file()
    assert (model_dir / "code" / "tasks" / "pyfunc_model.py").is_file()
    assert not list(model_dir.rglob("*.pkl"))  # models from code: no pickle in the model
    (fit,) = (model_dir / "artifacts" / "scoring").rglob("weave-*.json")  # the recorded map calibration
    assert json.loads(fit.read_text())["calibration"]["whitening"]["kind"] == "full"


def test_bad_requests_are_refused_clearly(registered: dict[str, Any]) -> None:
    model = mlflow.pyfunc.load_model(registered["uri"])
    with pytest.raises(Exception, match="not in this checkpoint"):
        model.predict(pd.DataFrame({"image": [registered["images"][0].read_bytes()]}),
                      params={"category": "gravel"})
    with pytest.raises(Exception, match="input image 0: not a readable image"):
        model.predict(pd.DataFrame({"image": [b"not a png"]}))
    with pytest.raises(Exception, match="no images to score"):
        model.predict(pd.DataFrame({"image": pd.Series([], dtype=object)}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


# Run in a fresh interpreter where neither the checkout nor the installed diffad can be
# imported: the model must bring its own code.
_LOAD_WITHOUT_DIFFAD = """
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                 and "editable" not in type(f).__module__]
sys.path = [p for p in sys.path if p not in ("", {checkout!r})]
assert importlib.util.find_spec("diffad_core") is None and importlib.util.find_spec("tasks") is None
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model({uri!r})
png = open({png!r}, "rb").read()
out = model.predict(pd.DataFrame({{"image": [png]}}))
import diffad_core
print(json.dumps({{"score": float(out["image_score"][0]), "code": diffad_core.__file__}}))
"""


@pytest.mark.integration
def test_the_model_carries_its_code(registered: dict[str, Any], tmp_path: Path) -> None:
    """The registered model loads and predicts in an interpreter that cannot import diffad:
    its own copy of the code (code/diffad_core, code/tasks) is used."""
    checkout = str(Path(__file__).resolve().parents[2])
    png = registered["images"][0]
    script = _LOAD_WITHOUT_DIFFAD.format(checkout=checkout, uri=registered["uri"], png=str(png))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": registered["store"]}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert not answer["code"].startswith(checkout) and "/code/diffad_core/" in answer["code"]
    expected = predict_images(load_for_evaluation(registered["checkpoint"]), "weave", [png])
    assert answer["score"] == pytest.approx(float(expected.image_scores[0]), rel=1e-6)


@pytest.mark.integration
def test_mlflow_models_serve(registered: dict[str, Any], tmp_path: Path) -> None:
    """``mlflow models serve -m models:/...@champion --env-manager local`` on a free port of
    127.0.0.1: a PNG posted as base64 comes back with the scores of mlflow.pyfunc."""
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    venv_bin = str(Path(sys.executable).parent)  # as in an activated environment: it runs uvicorn
    server = subprocess.Popen(
        [f"{venv_bin}/mlflow", "models", "serve", "-m", registered["uri"],
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": registered["store"],
             "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"},
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "server did not come up in 240 s"
                time.sleep(1)
        pngs = [p.read_bytes() for p in registered["images"][:2]]
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_split": {
            "columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in pngs]}})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    expected = mlflow.pyfunc.load_model(registered["uri"]).predict(pd.DataFrame({"image": pngs}))
    predictions = answer["predictions"]
    assert np.array_equal(np.asarray(predictions["image_score"], dtype=np.float32), expected["image_score"])
    assert np.array_equal(np.asarray(predictions["anomaly_map"], dtype=np.float32), expected["anomaly_map"])


def test_signature_names_the_input_and_outputs() -> None:
    sig = pyfunc_model.signature(64)
    assert sig.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    assert [o["name"] for o in sig.outputs.to_dict()] == ["image_score", "anomaly_map"]
    assert tuple(sig.outputs.to_dict()[1]["tensor-spec"]["shape"]) == (-1, 64, 64)
