"""The registered model as an MLflow pyfunc model (docs/internals.md "Pipeline", issue #12).

Each registered version is an MLflow model: the checkpoint's files (``model.safetensors``,
``padim.safetensors``, ``config.json``, ``meta.json``) are its artifacts, with the scoring fit
recorded beside them (``scoring/``: the map calibration, validation.ScoringFit) when the config
asks for one, so that it scores without the training data. ``mlflow.pyfunc.load_model(
"models:/<name>@champion")`` and ``mlflow models serve`` work on it;
``diffad_core.model.load_model`` reads the same files. The model carries its own code
(``code/diffad_core``, ``code/tasks``) and pins only diffad's dependencies, so an environment
built from its requirements (``--env-manager virtualenv``) needs no diffad package.

Input: a DataFrame with a column ``image`` of encoded image files (PNG, JPEG, ... bytes; in a
JSON request to ``/invocations``, base64 strings, which MLflow decodes by the signature).
Params: ``category`` (default: the model's only one) and ``alpha`` (default ``score.alpha``).
Output: ``{"image_score": (N,), "anomaly_map": (N, S, S)}``, float32, from
:func:`diffad_core.usecases.predict_images`, the call ``diffad predict`` makes.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModel, LoggedModelOutput
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
from packaging.requirements import Requirement

import diffad_core
from diffad_core.model import stored_config
from diffad_core.usecases import load_for_evaluation, pick_category, predict_images, scoring_fit
from diffad_core.validation import SCORING_FIT_FOLDER, needs_scoring_fit
from tasks import tracking

# artifact key -> file of the checkpoint folder (all four are written by diffad_core.model.save_model)
CHECKPOINT_ARTIFACTS = {"model": "model.safetensors", "padim": "padim.safetensors",
                        "config": "config.json", "meta": "meta.json"}
MODEL_NAME = "model"  # the logged model's name within its run
_ENTRY = Path(__file__).with_name("pyfunc_entry.py")  # models from code: no pickle in the model
# The packages the model imports, copied into it (MLflow puts them first on sys.path on load).
_CODE_PACKAGES = (Path(diffad_core.__file__).parent, Path(__file__).parent)
IMAGE_COLUMN = "image"


class DiffadPyfuncModel(mlflow.pyfunc.PythonModel):
    """Scores images with a registered diffad checkpoint (Eq. 11, the image score)."""

    def load_context(self, context: Any) -> None:
        # Every artifact lands in one folder: the checkpoint, with its scoring/ records.
        self._ev = load_for_evaluation(Path(context.artifacts["model"]).parent)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        params = params or {}
        category = pick_category(self._ev.model, params.get("category"))
        images = [bytes(b) for b in model_input[IMAGE_COLUMN]]
        prediction = predict_images(self._ev, category, images, alpha=params.get("alpha"))
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


def _pinned_requirements() -> list[str]:
    """diffad's runtime dependencies at the installed versions (no environment inference, so
    logging takes no extra model load). diffad itself is not one: its code is in the model."""
    pins = []
    for text in importlib.metadata.requires("diffad") or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            pins.append(f"{req.name}=={importlib.metadata.version(req.name)}")
    return pins


def _record_scoring_fits(checkpoint_dir: Path) -> None:
    """Fit and record each category's scoring fit under the checkpoint's own config (the one
    ``diffad predict`` and the MLflow model score with) when it asks for one and none is
    recorded yet; fitting needs the training data, which is present when a run registers."""
    if not needs_scoring_fit(stored_config(checkpoint_dir)):
        return
    ev = load_for_evaluation(checkpoint_dir)
    for category in ev.model.categories:
        scoring_fit(ev, category, progress=False)


def log_model(run_id: str, checkpoint_dir: Path) -> LoggedModel:
    """Log the checkpoint as an MLflow pyfunc model (an MLflow 3 logged model, output of
    ``run_id``) through the client, never the fluent active run or the global tracking URI. The
    model's code is ``tasks/pyfunc_entry.py`` (MLflow's "models from code"), not a pickle."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg = stored_config(checkpoint_dir)
    _record_scoring_fits(checkpoint_dir)
    client = tracking.get_client()
    logged = client.create_logged_model(client.get_run(run_id).info.experiment_id,
                                        name=MODEL_NAME, source_run_id=run_id, model_type="diffad")
    try:
        artifacts = {key: str(checkpoint_dir / name) for key, name in CHECKPOINT_ARTIFACTS.items()}
        if (checkpoint_dir / SCORING_FIT_FOLDER).is_dir():
            artifacts["scoring"] = str(checkpoint_dir / SCORING_FIT_FOLDER)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / MODEL_NAME
            with warnings.catch_warnings():
                # No input example on purpose: MLflow would load and run the model to check it.
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                mlflow.pyfunc.save_model(
                    str(local), python_model=str(_ENTRY), artifacts=artifacts,
                    signature=signature(int(cfg.data.image_size)),
                    pip_requirements=_pinned_requirements(),
                    code_paths=[str(p) for p in _CODE_PACKAGES],
                    mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id,
                                       model_id=logged.model_id, model_uuid=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged
