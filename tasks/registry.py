"""MLflow model registry: challengers, champions and ``models:/`` checkpoints (docs/internals.md "Pipeline").

A checkpoint is logged as an MLflow pyfunc model (``tasks.pyfunc_model``: its safetensors and
JSON files are the model's artifacts) and registered as a version of
``diffad-<dataset id>-<category>`` (``...-unified`` for the unified model); :func:`dataset_id`
names the data, so two datasets never share a model (issue #10). No pickled network:
:func:`diffad_core.model.load_model` reads the same files back, and versions registered before
(plain ``checkpoint/`` run artifacts) stay readable by :func:`resolve_models_uri`.

A new version gets the alias ``challenger``. It becomes ``champion`` when there is no champion
yet, or when it was measured on the champion's test manifest (tag ``test_manifest_hash``) and is
not worse on PRO and pixel AUROC beyond a tolerance; metrics of different test sets are never
compared. The decision is stored as version tags ``promotion_decision`` and ``promotion_reason``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow.exceptions import MlflowException

from diffad_core._atomic import replace_dir
from diffad_core.config import ConfigError, DiffadConfig, diffad_home
from tasks import pyfunc_model, tracking

CHECKPOINT_FILES = tuple(pyfunc_model.CHECKPOINT_ARTIFACTS.values())
COMPARED = ("pro", "pixel_auroc")
SHOWN = ("pixel_auroc", "pro", "image_auroc")
CHAMPION = "champion"
CHALLENGER = "challenger"
TEST_MANIFEST_TAG = "test_manifest_hash"
PROMOTED, KEPT, NOT_COMPARED = "promoted", "kept_challenger", "not_compared"
PROMOTED_BY_HAND = "promoted_by_hand"


def dataset_id(cfg: DiffadConfig) -> str:
    """The data's part of a model name: the dataset kind, then ``data.name`` when given. A folder
    without a name gets its root folder's name and a short hash of the resolved root path."""
    kind = cfg.data.dataset
    if cfg.data.name:
        return f"{kind}-{cfg.data.name}"
    if kind != "folder":
        return kind
    root = cfg.data.resolved_root().resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.name).strip("-.") or "root"
    return f"folder-{slug}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


def model_name(cfg: DiffadConfig, label: str) -> str:
    """``diffad-<dataset id>-<label>``; ``label`` is the category, or ``"unified"``."""
    return f"diffad-{dataset_id(cfg)}-{label}"


@dataclass(frozen=True)
class PromotionDecision:
    name: str
    version: str
    promoted: bool
    reason: str
    champion_version: str | None  # the champion before the decision
    decision: str  # PROMOTED | KEPT | NOT_COMPARED | PROMOTED_BY_HAND


def decide(challenger: dict[str, float], champion: dict[str, float] | None,
           tolerance: float) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger is not worse on PRO and pixel AUROC
    by more than ``tolerance`` (absolute, metrics in [0, 1])."""
    if champion is None:
        return True, "no champion yet"
    missing = [k for k in COMPARED if challenger.get(k) is None]
    if missing:
        return False, f"challenger lacks metrics {missing}"
    worse = []
    for key in COMPARED:
        theirs = champion.get(key)
        if theirs is None:
            continue
        if challenger[key] < theirs - tolerance:
            worse.append(f"{key} {challenger[key]:.4f} < champion {theirs:.4f} - {tolerance}")
    if worse:
        return False, "worse than champion: " + "; ".join(worse)
    parts = [f"{k} {challenger[k]:.4f} vs {champion.get(k, float('nan')):.4f}" for k in COMPARED]
    return True, f"not worse than champion within {tolerance}: " + ", ".join(parts)


def _metric_tags(metrics: dict[str, float | None]) -> dict[str, str]:
    return {f"metric.{k}": f"{float(v):.6f}" for k, v in metrics.items()
            if v is not None and v == v}


def version_metrics(tags: dict[str, str]) -> dict[str, float]:
    """Metrics stored on a model version as ``metric.<name>`` tags."""
    out = {}
    for key, value in tags.items():
        if key.startswith("metric."):
            try:
                out[key[len("metric."):]] = float(value)
            except ValueError:
                continue
    return out


def register_checkpoint(
    run_id: str,
    checkpoint_dir: Path,
    name: str,
    metrics: dict[str, float | None],
    tags: dict[str, str] | None = None,
) -> str:
    """Log the checkpoint as an MLflow pyfunc model of ``run_id`` and register it as a new
    version of ``name`` with alias ``challenger``. Returns the version."""
    checkpoint_dir = Path(checkpoint_dir)
    missing = [f for f in CHECKPOINT_FILES if not (checkpoint_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} lacks {', '.join(missing)}")
    logged = pyfunc_model.log_model(run_id, checkpoint_dir)
    client = tracking.get_client()
    try:
        client.create_registered_model(name, description="diffad checkpoint (Lu et al., ICCV 2023) "
                                       "as an MLflow pyfunc model: image bytes in, image score and "
                                       "anomaly map out")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    all_tags = {**_metric_tags(metrics), **(tags or {})}
    # The artifact location, not models:/<model_id>: a sqlite registry resolves the latter with
    # the process-wide tracking URI, which this client-based code never sets.
    mv = client.create_model_version(name, source=logged.artifact_location, run_id=run_id,
                                     tags=all_tags, model_id=logged.model_id)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


def find_version(name: str, tag: str, value: str) -> str | None:
    """The newest version of ``name`` whose tag ``tag`` equals ``value`` (None if none)."""
    client = tracking.get_client()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    hits = [int(v.version) for v in versions if v.tags.get(tag) == value]
    return str(max(hits)) if hits else None


def _alias_version(name: str, alias: str) -> Any | None:
    try:
        return tracking.get_client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def not_comparable(challenger_tags: dict[str, str], champion_tags: dict[str, str]) -> str | None:
    """Why two versions' metrics cannot be compared (None when they can): both must have been
    measured on the same test manifest."""
    mine, theirs = challenger_tags.get(TEST_MANIFEST_TAG), champion_tags.get(TEST_MANIFEST_TAG)
    if mine is None or theirs is None:
        whose = "the challenger's" if mine is None else "the champion's"
        return f"{whose} test set is unknown (no {TEST_MANIFEST_TAG} tag)"
    if mine != theirs:
        return f"measured on another test set (test manifest {mine[:12]} vs the champion's {theirs[:12]})"
    return None


def promote(name: str, version: str, tolerance: float, apply: bool = True) -> PromotionDecision:
    """Compare ``version`` with the current champion (only on the same test manifest) and record
    the decision as version tags; with ``apply`` a positive decision moves the ``champion`` alias."""
    client = tracking.get_client()
    mv = client.get_model_version(name, version)
    champ = _alias_version(name, CHAMPION)
    if champ is not None and str(champ.version) == str(version):
        champ = None
    why_not = None if champ is None else not_comparable(mv.tags, champ.tags)
    if why_not is not None:
        ok, decision = False, NOT_COMPARED
        reason = f"not compared with champion version {champ.version}: {why_not}; not promoted"
    else:
        champion_metrics = version_metrics(champ.tags) if champ is not None else None
        ok, reason = decide(version_metrics(mv.tags), champion_metrics, tolerance)
        if ok and not apply:
            reason = f"would promote ({reason}); promotion disabled"
        decision = PROMOTED if ok and apply else KEPT
    client.set_model_version_tag(name, version, "promotion_decision", decision)
    client.set_model_version_tag(name, version, "promotion_reason", reason[:5000])
    if ok and apply:
        client.set_registered_model_alias(name, CHAMPION, version)
    return PromotionDecision(name=name, version=str(version), promoted=ok and apply, reason=reason,
                             champion_version=None if champ is None else str(champ.version),
                             decision=decision)


def promote_by_hand(name: str, version: str, reason: str) -> PromotionDecision:
    """Make ``version`` the champion without a comparison (``diffad registry promote``): the way
    out when the champion cannot be compared with anything (no test manifest tag, or another
    test set). The decision and ``reason`` are recorded as the version's tags."""
    client = tracking.get_client()
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise ConfigError(f"registry: no version {version} of model {name!r} at "
                          f"{tracking.tracking_uri()}") from None
    champ = _alias_version(name, CHAMPION)
    reason = f"promoted by hand: {reason}"
    client.set_model_version_tag(name, version, "promotion_decision", PROMOTED_BY_HAND)
    client.set_model_version_tag(name, version, "promotion_reason", reason[:5000])
    client.set_registered_model_alias(name, CHAMPION, version)
    return PromotionDecision(name=name, version=str(version), promoted=True, reason=reason,
                             champion_version=None if champ is None else str(champ.version),
                             decision=PROMOTED_BY_HAND)


def compare(dataset: str, categories: list[str] | None = None) -> list[dict[str, Any]]:
    """Champion vs challenger per registered model whose name starts with ``diffad-<dataset>-``
    (a dataset kind such as ``folder``, or a whole :func:`dataset_id`); metrics from version tags."""
    client = tracking.get_client()
    prefix = f"diffad-{dataset}-"
    names = sorted(m.name for m in client.search_registered_models(
        filter_string=f"name LIKE '{prefix}%'"))
    if categories:
        names = [n for n in names if any(n.endswith(f"-{c}") for c in categories)]
    rows = []
    for name in names:
        row: dict[str, Any] = {"model": name}
        for alias in (CHAMPION, CHALLENGER):
            mv = _alias_version(name, alias)
            row[f"{alias}_version"] = None if mv is None else str(mv.version)
            metrics = {} if mv is None else version_metrics(mv.tags)
            for key in SHOWN:
                row[f"{alias}_{key}"] = metrics.get(key)
            if alias == CHALLENGER:
                row["decision"] = None if mv is None else mv.tags.get("promotion_decision")
        rows.append(row)
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """A plain-text side-by-side table of :func:`compare` rows."""
    header = ["model", "champion", "pixel_auroc", "pro", "image_auroc",
              "challenger", "pixel_auroc", "pro", "image_auroc", "decision"]

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [[r["model"], fmt(r["champion_version"]),
              *(fmt(r[f"champion_{k}"]) for k in SHOWN), fmt(r["challenger_version"]),
              *(fmt(r[f"challenger_{k}"]) for k in SHOWN), fmt(r["decision"])] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def resolve_models_uri(uri: str) -> Path:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> a local checkpoint dir.

    The files are downloaded once into ``<DIFFAD_HOME>/model-cache/<name>/<version>``, from the
    version's MLflow model (its artifacts) or, for versions registered before, from the plain
    ``checkpoint/`` run artifacts.
    """
    if not uri.startswith("models:/"):
        raise ValueError(f"not a models:/ URI: {uri!r}")
    ref = uri[len("models:/"):].strip("/")
    client = tracking.get_client()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, version = ref.split("/", 1)
            mv = client.get_model_version(name, version)
        else:
            raise ValueError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    except MlflowException as exc:
        raise FileNotFoundError(f"{uri}: not in the registry at {tracking.tracking_uri()} "
                                f"({exc.message})") from exc
    dest = diffad_home().resolve() / "model-cache" / mv.name / str(mv.version)
    if (dest / "model.safetensors").exists():
        return dest
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(staging),
                                                     tracking_uri=tracking.tracking_uri()))
        # An MLflow model keeps the checkpoint files in its artifacts/ folder.
        files = got / "artifacts" if (got / "MLmodel").is_file() else got
        replace_dir(files, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
