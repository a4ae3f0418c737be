"""MLflow tracking for the pipeline (docs/internals.md "Pipeline").

Everything goes through an explicit :class:`mlflow.MlflowClient` and run ids, never the fluent
"active run" stack, so a child run can be opened in another thread, process or machine from the
parent's run id alone. The store is ``MLFLOW_TRACKING_URI`` when set, else
``sqlite:///<DIFFAD_HOME>/mlflow.db`` with artifacts in ``<DIFFAD_HOME>/mlartifacts``; for any
local store the experiment's artifact location is set beside the database, so nothing ever lands
in a stray ``./mlruns``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from diffad_core.config import ConfigError, DiffadConfig, diffad_home
from diffad_core.locks import file_lock

PARENT_TAG = "mlflow.parentRunId"
PARAM_LIMIT = 500  # we keep params short and readable; the whole config is also an artifact
_BATCH = 900  # MLflow accepts at most 1000 metrics / 100 params per log_batch


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the sqlite store under DIFFAD_HOME."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{diffad_home().resolve() / 'mlflow.db'}"


def local_artifact_root(uri: str | None = None) -> Path | None:
    """Where artifacts go for a local store (sqlite file or directory); None for a server."""
    uri = uri or tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = uri[len("sqlite:///"):]
        if not db or db == ":memory:":
            return diffad_home().resolve() / "mlartifacts"
        return Path(db).expanduser().resolve().parent / "mlartifacts"
    if parsed.scheme in ("", "file"):
        base = Path(parsed.path if parsed.scheme == "file" else uri).expanduser().resolve()
        return base / "mlartifacts"
    return None


def local_store_file(uri: str | None = None) -> Path | None:
    """The database file of a local sqlite store; None for a server or a folder store."""
    uri = uri or tracking_uri()
    if urlparse(uri).scheme != "sqlite":
        return None
    db = uri[len("sqlite:///"):]
    return None if not db or db == ":memory:" else Path(db).expanduser().resolve()


def health_problem(base_url: str, timeout: float) -> str | None:
    """Why ``<base_url>/health`` does not answer HTTP 200 within ``timeout`` seconds (the
    unreachable reason or the status), or None when it does. MLflow's and Prefect's servers
    both serve it."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"is unreachable ({getattr(exc, 'reason', exc)})"
    return None if status == 200 else f"answered HTTP {status} on /health"


def check_store(timeout: float = 5.0) -> str:
    """The tracking URI, once it is known to work: a server must answer ``/health`` within
    ``timeout`` seconds, a local store's folder (and database) must be writable. Otherwise a
    :class:`ConfigError` naming the URI or path, in seconds rather than after MLflow's retries."""
    uri = tracking_uri()
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        problem = health_problem(uri, timeout)
        if problem is not None:
            raise ConfigError(f"MLflow tracking server {uri} {problem}; check MLFLOW_TRACKING_URI")
        return uri
    db = local_store_file(uri)
    folder = db.parent if db is not None else local_artifact_root(uri)
    if folder is None:  # another scheme (databricks, postgresql, ...): MLflow checks it itself
        return uri
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
        if db is not None and db.exists():
            with open(db, "ab"):
                pass
    except OSError as exc:
        raise ConfigError(f"MLflow store {uri}: {exc.filename or folder} is not writable "
                          f"({exc.strerror})") from None
    return uri


def get_client() -> MlflowClient:
    uri = tracking_uri()
    db = local_store_file(uri)
    if db is None or db in _READY_STORES:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    return _open_store_once(uri, db)


# The sqlite stores whose schema this process has seen complete (MLflow caches its store
# objects per URI too, so their set-up runs once per process).
_READY_STORES: set[Path] = set()


def _open_store_once(uri: str, db: Path) -> MlflowClient:
    """A client of the sqlite file ``db``, its tracking and registry stores first opened under a
    lock beside it.

    MLflow creates a new database's tables (and runs its migrations) when a store is first
    opened; two processes doing that at once on one new file race, and the late ones fail with
    "table ... already exists". Under the lock the first creates the schema whole and the others
    find it done."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(db.parent / f".{db.name}.lock", f"MLflow store {db}", wait=True):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # opens (and if needed creates) the tracking store
        client.search_registered_models(max_results=1)  # and the model registry's
    _READY_STORES.add(db)
    return client


def experiment_name(cfg: DiffadConfig) -> str:
    return f"diffad-{cfg.data.dataset}"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Return the experiment id, creating it with a local artifact location when needed."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = local_artifact_root()
    location = None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        location = (root / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config to dotted keys; values longer than PARAM_LIMIT are cut."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, prefix=f"{name}."))
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            if len(text) > PARAM_LIMIT:
                text = text[: PARAM_LIMIT - 3] + "..."
            out[name] = text
    return out


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {k: (v if isinstance(v, str) else json.dumps(v))[:5000] for k, v in tags.items()
            if v is not None}


def start_run(
    cfg: DiffadConfig,
    run_name: str,
    tags: Mapping[str, Any],
    parent_run_id: str | None = None,
    log_config: bool = True,
) -> str:
    """Open a run (a child of ``parent_run_id`` when given) and log the resolved config."""
    client = get_client()
    exp_id = ensure_experiment(client, experiment_name(cfg))
    all_tags = dict(tags)
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
        all_tags["parent_run_id"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=_clean_tags(all_tags))
    run_id = run.info.run_id
    if log_config:
        params = [Param(k, v) for k, v in flatten_config(cfg.to_dict()).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        log_dict(run_id, cfg.to_dict(), "config.json")
    return run_id


def close_superseded_runs(experiment: str, diffad_run_id: str, current: str) -> list[str]:
    """Close the runs of benchmark run ``diffad_run_id`` (parent and children, tag
    ``diffad_run_id``) left RUNNING by a process that died, as KILLED, and tag every earlier
    parent or child ``diffad_superseded_by`` = ``current`` (the rerun's parent) with a note.
    Call it only while holding the run lock: then no live process owns those runs."""
    client = get_client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.diffad_run_id = '{diffad_run_id}'",
                              max_results=1000)
    closed = []
    for run in runs:
        if run.info.run_id == current:
            continue
        tags = {"diffad_superseded_by": current}
        if run.info.status == "RUNNING":
            tags["diffad_note"] = (f"closed as KILLED by a rerun of {diffad_run_id}: the process "
                                   "that ran it ended without closing it")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
        set_tags(run.info.run_id, tags)
    return closed


def end_run(run_id: str, status: str = "FINISHED") -> None:
    get_client().set_terminated(run_id, status=status)


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(k, v) for k, v in _clean_tags(tags).items()]
    if items:
        get_client().log_batch(run_id, tags=items)


def log_metrics(run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
    """Log finite scalar metrics (None / NaN are skipped)."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if v is not None and v == v]
    if items:
        get_client().log_batch(run_id, metrics=items)


def log_curve(run_id: str, key: str, points: Iterable[tuple[int, float]]) -> None:
    """Log a step-wise curve (e.g. the training loss)."""
    now = int(time.time() * 1000)
    items = [Metric(key, float(v), now, int(s)) for s, v in points if v == v]
    client = get_client()
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, metrics=items[i : i + _BATCH])


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        parent = str(Path(artifact_file).parent)
        get_client().log_artifact(run_id, str(path), None if parent == "." else parent)


def log_artifacts(run_id: str, local: Path, artifact_path: str | None = None) -> None:
    """Log a file or a directory."""
    client = get_client()
    if local.is_dir():
        client.log_artifacts(run_id, str(local), artifact_path)
    elif local.exists():
        client.log_artifact(run_id, str(local), artifact_path)
