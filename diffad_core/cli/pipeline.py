"""The pipeline commands (``benchmark``, ``rerun``, ``registry compare|promote``): resolve the config here,
then run the Prefect flows, which (with ``tasks`` and MLflow) are imported inside the handlers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from diffad_core.cli._common import (
    CliError,
    add_category_argument,
    add_config_arguments,
    add_progress_argument,
    command,
    config_from_args,
)
from diffad_core.config import DATASET_KINDS, DiffadConfig
from diffad_core.progress import NO_PROGRESS_ENV


def register(subparsers: Any) -> None:
    """Add ``benchmark``, ``rerun``, ``registry compare`` and ``registry promote``."""
    p = subparsers.add_parser(
        "benchmark", help="run the full benchmark flow (train, score, evaluate, report, registry)",
        description="Run the full-benchmark Prefect flow. With the default local executor no "
                    "server is needed (Prefect's ephemeral mode).")
    add_config_arguments(p, default_preset=None)
    p.add_argument("--dataset", default=None, choices=DATASET_KINDS,
                   help="data.dataset (default: the preset's)")
    p.add_argument("--root", default=None, help="data.root (default: $DIFFAD_HOME/data/<dataset>)")
    add_category_argument(p, "data.categories: benchmark only this category (default: all)")
    p.add_argument("--executor", choices=("local", "deployments"), default=None,
                   help="runtime.executor: local (in-process) or deployments (workers pull categories)")
    p.add_argument("--run-id", default=None, help="default: a new one")
    p.add_argument("--date", default=None, help="a date that enters the training cache key")
    p.add_argument("--no-register", dest="register", action="store_false",
                   help="registry.register_models=false: do not register models in MLflow")
    p.add_argument("--no-promote", dest="promote", action="store_false",
                   help="registry.promote=false: register challengers but never promote")
    _add_verbose_argument(p)
    add_progress_argument(p)
    command(p, _benchmark)

    p = subparsers.add_parser("rerun", help="rerun some categories of a benchmark run "
                              "(with the run's own config)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--failed", action="store_true", help="the categories that failed")
    add_category_argument(p, "a category to rerun")
    _add_verbose_argument(p)
    add_progress_argument(p)
    command(p, _rerun)

    reg = subparsers.add_parser("registry", help="the MLflow model registry")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)
    p = reg_sub.add_parser("compare", help="champion vs challenger, side by side")
    p.add_argument("--dataset", default="synthetic",
                   help="models named diffad-<DATASET>-*: a dataset kind (synthetic, folder, ...) "
                        "or a whole dataset id such as folder-<data.name> (default synthetic)")
    add_category_argument(p, "only this category (default: all registered)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    command(p, _registry_compare)
    p = reg_sub.add_parser("promote", help="make a version the champion without a comparison "
                                           "(when the champion cannot be compared: another or "
                                           "unknown test set)")
    p.add_argument("model", help="registered model name, e.g. diffad-synthetic-weave")
    p.add_argument("version", help="the version to make champion")
    p.add_argument("--reason", required=True, help="recorded on the version (promotion_reason)")
    command(p, _registry_promote)


# ----------------------------------------------------------------------------- environment
def prefect_environment() -> None:
    """Settings the ephemeral Prefect server needs to start reliably on a slow machine, set
    before Prefect is imported; values the user already set win."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into a normal exit so Prefect's exit handlers stop the temporary server
    (otherwise it outlives a killed ``diffad benchmark``)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also print Prefect's flow and task INFO lines (always in the Prefect "
                             "UI and in results/<run_id>/prefect.log)")


def _console_progress(show: bool) -> None:
    """``--no-progress``: no bar anywhere in this process, whose threads run the flow's tasks
    (nor in the processes it starts)."""
    if not show:
        os.environ[NO_PROGRESS_ENV] = "1"


def _console_logging(run_id: str, verbose: bool) -> None:
    """The console shows the progress bars, warnings and the final table; Prefect's flow and
    task INFO lines (and MLflow's) go to the Prefect UI (its API handler, untouched) and to
    ``results/<run_id>/prefect.log``. ``verbose`` keeps them on the console too. Called after
    Prefect and MLflow are imported (they configure their loggers on import)."""
    import logging

    from prefect.logging.formatters import PrefectFormatter
    from prefect.logging.handlers import PrefectConsoleHandler

    from tasks.runs import run_dir

    path = run_dir(run_id) / "prefect.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(PrefectFormatter(
        format="%(asctime)s | %(levelname)-7s | %(name)s - %(message)s",
        flow_run_fmt="%(asctime)s | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s",
        task_run_fmt="%(asctime)s | %(levelname)-7s | Task run %(task_run_name)r - %(message)s"))
    for name in ("prefect", "mlflow"):
        logging.getLogger(name).addHandler(to_file)
    if verbose:
        return
    # MLflow's per-artifact download bars (one per registered model) say nothing a person needs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    consoles += [h for h in logging.getLogger("mlflow").handlers
                 if isinstance(h, logging.StreamHandler) and h is not to_file]
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))


def _store_hint() -> list[str]:
    from tasks import tracking

    uri = tracking.tracking_uri()
    lines = [f"MLflow store:   {uri}"]
    root = tracking.local_artifact_root(uri)
    if root is not None:
        lines.append(f"MLflow artifacts: {root}")
        lines.append(f"Open it with:   mlflow ui --backend-store-uri {uri} "
                     f"--default-artifact-root {root}")
    else:
        lines.append(f"Open it at:     {uri}")
    return lines


# ----------------------------------------------------------------------------- benchmark
def benchmark_config(args: argparse.Namespace) -> DiffadConfig:
    """The run's resolved config: preset, ``--config``, the command's own flags (as config
    values), then ``--set`` (which wins)."""
    if args.preset is None:
        # A folder of the user's own images gets the preset fitted to its data; the rest the demo.
        args.preset = "cpu" if args.dataset == "folder" else "cpu-demo"
    extra: dict[str, dict[str, Any]] = {}
    data = {k: v for k, v in (("dataset", args.dataset), ("root", args.root),
                              ("categories", args.categories)) if v}
    if data:
        extra["data"] = data
    if args.executor:
        extra["runtime"] = {"executor": args.executor}
    registry = {k: False for k, on in (("register_models", args.register),
                                        ("promote", args.promote)) if not on}
    if registry:
        extra["registry"] = registry
    return config_from_args(args, extra)


def _check_data(cfg: DiffadConfig) -> None:
    """The dataset's categories exist and pass ``data verify``'s checks (a category typo, a
    defect without its mask... fail here in seconds). Skipped when MVTec/BTAD still has to be
    downloaded: the flow downloads, then checks."""
    from diffad_core.data import list_categories, require_verified, resolve_dataset

    root = cfg.data.resolved_root()
    if cfg.data.dataset in ("mvtec", "btad") and not (
            root.is_dir() and set(cfg.categories()) <= set(list_categories(root, cfg.data.dataset))):
        return
    root = resolve_dataset(cfg, progress=True)
    require_verified(root, cfg.data.dataset, cfg.categories())


def _benchmark(args: argparse.Namespace) -> int:
    # The config, the stores and the data are checked first: a bad key, an unreachable store
    # or a broken dataset fails in seconds, before any server starts (flows/guard.py).
    cfg = benchmark_config(args)
    _console_progress(args.progress)
    prefect_environment()
    from flows.guard import preflight, run_lock, temporary_prefect_server
    from tasks.runs import new_run_id

    preflight()
    run_id = args.run_id or new_run_id(args.date)
    with run_lock(run_id):  # a second benchmark of this run id refuses before any more work
        _check_data(cfg)
        _exit_on_sigterm()
        from flows.benchmark import full_benchmark

        _console_logging(run_id, args.verbose)
        with temporary_prefect_server():
            state = full_benchmark(config=cfg, run_id=run_id, date=args.date, return_state=True)
    return _finish(run_id, state)


def _finish(run_id: str, state: Any) -> int:
    """Print each category's outcome, the metrics, the registry decisions and where things are;
    1 when the flow did not complete."""
    from tasks.runs import read_category_status, read_run_record, run_dir

    record = read_run_record(run_id)
    print()
    print(f"run {run_id}: {record.status if record is not None else state.name}")
    for cat in sorted(record.categories if record is not None else []):
        outcome = read_category_status(run_id, cat)
        status = outcome.status if outcome is not None else "not run"
        err = f"  {outcome.error}" if outcome is not None and outcome.error else ""
        print(f"  {cat:<14} {status}{err}")
    metrics = run_dir(run_id) / "metrics.parquet"
    if metrics.exists():
        from diffad_core import results
        from diffad_core.report import metrics_markdown_table

        print()
        print(metrics_markdown_table(results.read_metrics(run_dir(run_id))))
    for model, decision in (record.registry if record is not None else {}).items():
        print(f"registry: {model}: {decision}")
    print()
    report = record.report if record is not None else {}
    if report:
        print(f"Report:         {report.get('markdown')}  (and {report.get('html')})")
    print(f"Parquet:        {run_dir(run_id) / 'scores'}  and  {metrics}")
    for line in _store_hint():
        print(line)
    if not state.is_completed():
        print(f"diffad: benchmark run {run_id} did not complete: {state.message or state.name}",
              file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- rerun
def _rerun(args: argparse.Namespace) -> int:
    if not args.failed and not args.categories:
        raise CliError("give --failed or --category C (repeatable)")
    _console_progress(args.progress)
    prefect_environment()
    from tasks.runs import read_run_record, run_dir, run_record_path

    if read_run_record(args.run_id) is None:
        raise CliError(f"no run {args.run_id!r} under {run_dir(args.run_id).parent} "
                       f"(missing {run_record_path(args.run_id)})")
    from flows.guard import preflight, run_lock, temporary_prefect_server

    preflight()
    _exit_on_sigterm()
    from flows.benchmark import rerun_categories

    _console_logging(args.run_id, args.verbose)

    with run_lock(args.run_id), temporary_prefect_server():
        state = rerun_categories(run_id=args.run_id, categories=args.categories or None,
                                 failed=args.failed, return_state=True)
    return _finish(args.run_id, state)


# ----------------------------------------------------------------------------- registry
def _registry_compare(args: argparse.Namespace) -> int:
    """Exit 1 when the registry holds no model of the dataset."""
    from tasks import registry, tracking

    rows = registry.compare(args.dataset, args.categories or None)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no registered models diffad-{args.dataset}-* in the registry at "
              f"{tracking.tracking_uri()}")
        return 1
    print(registry.format_comparison(rows))
    return 0


def _registry_promote(args: argparse.Namespace) -> int:
    from tasks import registry

    decision = registry.promote_by_hand(args.model, args.version, args.reason)
    was = "no champion before" if decision.champion_version is None else \
        f"champion was version {decision.champion_version}"
    print(f"{decision.name}: version {decision.version} is champion ({was}); {decision.reason}")
    return 0
