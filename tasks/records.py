"""Typed records that tasks return and flows read (and that travel as JSON between processes).

Pydantic models: they pickle for Prefect's persisted task results, serialise to JSON for the
per-category status files that deployments hand back through shared storage, and reject
unknown fields, so a flow never reads a dict by a misspelt string key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreparedData(_Record):
    """The dataset a run uses: where it is, its categories and manifest hashes."""

    root: str
    manifest_hash: str
    categories: list[str]
    category_hashes: dict[str, str]  # per category, so one category's change retrains only it


class WeightsInfo(_Record):
    """Pretrained weights a run uses, for the report and MLflow."""

    role: str  # features | padim | adm-init
    name: str
    pretrained: bool
    file: str | None = None
    sha256: str | None = None


class TrainedModel(_Record):
    """A finished training: the checkpoint folder and its loss curve."""

    checkpoint_dir: str
    steps: int
    seconds: float
    final_loss: float | None
    losses: list[tuple[int, float]]
    train_key: str
    trained_at: float
    init_report: list[str] = []


class Timings(_Record):
    train_seconds: float | None = None
    score_ms_per_image: float | None = None
    reconstruct_ms_per_image: float | None = None


class CategoryMetrics(_Record):
    """One row of the run's metrics table (``results.evaluation``), as the flows read it."""

    category: str
    status: str = "ok"
    pixel_auroc: float | None = None
    pro: float | None = None
    image_auroc: float | None = None
    n_test: int | None = None
    alpha: float | None = None
    train_seconds: float | None = None
    score_ms_per_image: float | None = None
    reconstruct_ms_per_image: float | None = None
    model_version: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CategoryMetrics:
        """A row of ``results.evaluate_run``'s table (NaN -> None; columns not named here, such
        as the ablation scorers', stay in the parquet table only)."""
        values = {k: (None if isinstance(v, float) and v != v else v)
                  for k, v in row.items() if k in cls.model_fields}
        return cls.model_validate(values)


class CategoryOutcome(_Record):
    """How one category of a run ended (``results/<run_id>/status/<category>.json``)."""

    category: str
    status: Literal["done", "failed"]
    error: str | None = None
    traceback: str | None = None
    metrics: CategoryMetrics | None = None
    timings: Timings | None = None
    checkpoint_dir: str | None = None
    train_key: str | None = None
    model_version: str | None = None
    mlflow_run_id: str | None = None
    config_hash: str | None = None
    manifest_hash: str | None = None
    alpha: float | None = None
    alpha_source: str | None = None
    reused: bool = False


class RegistryOutcome(_Record):
    """What registering one model did (``tasks.registry``)."""

    name: str
    version: str
    registered: bool
    promoted: bool
    reason: str
    champion_version: str | None = None
