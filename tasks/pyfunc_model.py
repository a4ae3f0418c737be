"""The registered model as an MLflow pyfunc model (docs/internals.md "Pipeline", issue #12).

Each registered version is an MLflow model: the checkpoint's files (``model.safetensors``,
``padim.safetensors``, ``config.json``, ``meta.json``) are its artifacts, beside the map
calibration of each category when the config standardises the maps, so that it scores without
the training data. ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and
``mlflow models serve`` work on it; ``diffad_core.model.load_model`` reads the same files.

Input: a DataFrame with a column ``image`` of encoded image files (PNG, JPEG, ... bytes; in a
JSON request to ``/invocations``, base64 strings, which MLflow decodes by the signature).
Params: ``category`` (default: the model's only one) and ``alpha`` (default ``score.alpha``).
Output: ``{"image_score": (N,), "anomaly_map": (N, S, S)}``, float32, from
:func:`diffad_core.usecases.predict_images`, the call ``diffad predict`` makes.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModel, LoggedModelOutput
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
from packaging.requirements import Requirement

from diffad_core.model import stored_config
from diffad_core.score import MapCalibration
from diffad_core.usecases import (
    load_for_evaluation,
    map_calibration,
    pick_category,
    predict_images,
)
from tasks import tracking

# artifact key -> file of the checkpoint folder (all four are written by diffad_core.model.save_model)
CHECKPOINT_ARTIFACTS = {"model": "model.safetensors", "padim": "padim.safetensors",
                        "config": "config.json", "meta": "meta.json"}
CALIBRATION_ARTIFACT = "map_calibration.json"
MODEL_NAME = "model"  # the logged model's name within its run
IMAGE_COLUMN = "image"


class DiffadPyfuncModel(mlflow.pyfunc.PythonModel):
    """Scores images with a registered diffad checkpoint (Eq. 11, the image score)."""

    def load_context(self, context: Any) -> None:
        folder = Path(context.artifacts["model"]).parent  # every artifact lands in one folder
        self._ev = load_for_evaluation(folder)
        stored = context.artifacts.get("calibration")
        data = json.loads(Path(stored).read_text()) if stored else {}
        self._calibrations = {c: MapCalibration(**v) for c, v in data.items()}

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        params = params or {}
        category = pick_category(self._ev.model, params.get("category"))
        images = [bytes(b) for b in model_input[IMAGE_COLUMN]]
        prediction = predict_images(self._ev, category, images, alpha=params.get("alpha"),
                                    calibration=self._calibrations.get(category))
        return {"image_score": prediction.image_scores, "anomaly_map": prediction.anomaly_maps}


def signature(image_size: int) -> ModelSignature:
    """Bytes in, one score and one (S, S) map per image out; ``category`` and ``alpha`` params."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,), "image_score"),
                        TensorSpec(np.dtype(np.float32), (-1, image_size, image_size), "anomaly_map")]),
        params=ParamSchema([ParamSpec("category", DataType.string, None),
                            ParamSpec("alpha", DataType.double, None)]),
    )


def pinned_requirements() -> list[str]:
    """diffad and its runtime dependencies at the installed versions (no environment inference,
    so logging takes no extra model load). diffad itself installs from the team's own index or
    checkout; ``mlflow models serve --env-manager local`` uses the current environment."""
    pins = [f"diffad=={importlib.metadata.version('diffad')}"]
    for text in importlib.metadata.requires("diffad") or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            pins.append(f"{req.name}=={importlib.metadata.version(req.name)}")
    return pins


def calibrations(checkpoint_dir: Path) -> dict[str, MapCalibration]:
    """Each category's map calibration when the checkpoint's config standardises the maps (then
    its training data must be present now); empty otherwise. The same numbers ``diffad predict``
    computes from the data."""
    if not stored_config(checkpoint_dir).score.calibrate_maps:
        return {}
    ev = load_for_evaluation(checkpoint_dir)
    out = {}
    for category in ev.model.categories:
        calibration = map_calibration(ev, category)
        if calibration is not None:
            out[category] = calibration
    return out


def log_model(run_id: str, checkpoint_dir: Path) -> LoggedModel:
    """Log the checkpoint as an MLflow pyfunc model (an MLflow 3 logged model, output of
    ``run_id``) through the client, never the fluent active run or the global tracking URI."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg = stored_config(checkpoint_dir)
    client = tracking.get_client()
    logged = client.create_logged_model(client.get_run(run_id).info.experiment_id,
                                        name=MODEL_NAME, source_run_id=run_id, model_type="diffad")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            artifacts = {key: str(checkpoint_dir / name) for key, name in CHECKPOINT_ARTIFACTS.items()}
            stored = calibrations(checkpoint_dir)
            if stored:
                artifacts["calibration"] = str(Path(tmp) / CALIBRATION_ARTIFACT)
                Path(artifacts["calibration"]).write_text(
                    json.dumps({c: v.to_dict() for c, v in stored.items()}, indent=2, sort_keys=True))
            local = Path(tmp) / MODEL_NAME
            mlflow.pyfunc.save_model(
                str(local), python_model=DiffadPyfuncModel(), artifacts=artifacts,
                signature=signature(int(cfg.data.image_size)), pip_requirements=pinned_requirements(),
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id,
                                   model_id=logged.model_id, model_uuid=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged
