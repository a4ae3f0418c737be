"""The pipeline commands: ``diffad benchmark``, ``diffad registry compare``, ``diffad rerun``.

Imported at CLI start-up, so nothing heavy (torch, prefect, mlflow) is imported at module level.
Importing it registers the ``models:/`` checkpoint resolver, so ``diffad predict --model
models:/diffad-<dataset>-<category>@champion`` loads from the MLflow registry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from diffad_core._cli_common import add_config_arguments
from diffad_core._commands import register_checkpoint_resolver


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


def _resolve_models_uri(uri: str) -> Path:
    from tasks.registry import resolve_models_uri

    return resolve_models_uri(uri)


register_checkpoint_resolver("models", _resolve_models_uri)


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
def _cmd_benchmark(args: argparse.Namespace) -> int:
    prefect_environment()
    _exit_on_sigterm()
    from flows.benchmark import full_benchmark
    from tasks import pipeline as p

    overrides = _file_overrides(args.config_file) + list(args.overrides)
    # Build the config once here so a bad preset/override fails before any server starts.
    p.make_config(args.preset, overrides, args.dataset, args.root, args.categories)
    run_id = args.run_id or p.new_run_id(args.date)
    state = full_benchmark(
        dataset=args.dataset, root=args.root, categories=args.categories, preset=args.preset,
        overrides=overrides, executor=args.executor, register_models=args.register,
        promote=args.promote, run_id=run_id, date=args.date, return_state=True)
    return _finish(run_id, state)


def _file_overrides(path: str | None) -> list[str]:
    """A YAML config file as ``key=value`` overrides (JSON values), so the flow's parameters
    stay plain JSON and a worker elsewhere needs no copy of the file."""
    if not path:
        return []
    from diffad_core.config import read_config_file

    data = read_config_file(path)

    def flat(d: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out += flat(v, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k}={json.dumps(v)}")
        return out

    return flat(data, "")


def _finish(run_id: str, state: Any) -> int:
    from tasks import pipeline as p

    record = p.read_run_record(run_id) or {}
    print()
    print(f"run {run_id}: {record.get('status', state.name)}")
    cats = record.get("categories", {})
    for cat in sorted(cats):
        o = cats[cat]
        err = f"  {o['error']}" if o.get("error") else ""
        print(f"  {cat:<14} {o.get('status')}{err}")
    metrics = p.run_dir(run_id) / "metrics.parquet"
    if metrics.exists():
        from diffad_core import results
        from diffad_core.report import metrics_markdown_table

        print()
        print(metrics_markdown_table(results.read_metrics(p.run_dir(run_id))))
    for model, decision in (record.get("registry") or {}).items():
        print(f"registry: {model}: {decision}")
    print()
    report = record.get("report") or {}
    if report:
        print(f"Report:         {report.get('markdown')}  (and {report.get('html')})")
    print(f"Parquet:        {p.run_dir(run_id) / 'scores'}  and  {metrics}")
    for line in _store_hint():
        print(line)
    if not state.is_completed():
        print(f"diffad: benchmark run {run_id} did not complete: {state.message or state.name}",
              file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- rerun
def _cmd_rerun(args: argparse.Namespace) -> int:
    prefect_environment()
    _exit_on_sigterm()
    from flows.benchmark import rerun_categories
    from tasks import pipeline as p

    if not args.failed and not args.categories:
        print("diffad rerun: give --failed or --category C (repeatable)", file=sys.stderr)
        return 2
    if p.read_run_record(args.run_id) is None:
        print(f"diffad rerun: no run {args.run_id!r} under {p.run_dir(args.run_id).parent} "
              f"(missing {p.run_record_path(args.run_id)})", file=sys.stderr)
        return 2
    state = rerun_categories(run_id=args.run_id, categories=args.categories or None,
                             failed=args.failed, executor=args.executor, return_state=True)
    return _finish(args.run_id, state)


# ----------------------------------------------------------------------------- registry
def _cmd_registry_compare(args: argparse.Namespace) -> int:
    from tasks import registry

    rows = registry.compare(args.dataset, args.categories or None)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no registered models diffad-{args.dataset}-* in the registry at "
              f"{registry.tracking.tracking_uri()}")
        return 1
    print(registry.format_comparison(rows))
    return 0


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "benchmark", help="run the full benchmark flow (train, score, evaluate, report, registry)",
        description="Run the full-benchmark Prefect flow. With the default local executor no "
                    "server is needed (Prefect's ephemeral mode).")
    add_config_arguments(bench, default_preset="cpu-demo")
    bench.add_argument("--dataset", default=None, help="mvtec | btad | folder | synthetic "
                       "(default: the preset's)")
    bench.add_argument("--root", default=None, help="dataset folder (default: $DIFFAD_HOME/data/<dataset>)")
    bench.add_argument("--categories", nargs="+", default=None, help="default: all")
    bench.add_argument("--executor", choices=("local", "deployments"), default=None,
                       help="local (in-process, default) or deployments (workers pull categories)")
    bench.add_argument("--run-id", default=None, help="default: a new one")
    bench.add_argument("--date", default=None, help="a date that enters the training cache key")
    bench.add_argument("--no-register", dest="register", action="store_const", const=False,
                       default=None, help="do not register models in MLflow")
    bench.add_argument("--no-promote", dest="promote", action="store_const", const=False,
                       default=None, help="register challengers but never promote")
    bench.set_defaults(func=_cmd_benchmark)

    rerun = subparsers.add_parser("rerun", help="rerun some categories of a benchmark run")
    rerun.add_argument("--run-id", required=True)
    rerun.add_argument("--failed", action="store_true", help="the categories that failed")
    rerun.add_argument("--category", dest="categories", action="append", default=[],
                       help="a category to rerun (repeatable)")
    rerun.add_argument("--executor", choices=("local", "deployments"), default=None)
    rerun.set_defaults(func=_cmd_rerun)

    reg = subparsers.add_parser("registry", help="the MLflow model registry")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)
    cmp_ = reg_sub.add_parser("compare", help="champion vs challenger, side by side")
    cmp_.add_argument("--dataset", default="synthetic")
    cmp_.add_argument("--category", dest="categories", action="append", default=[])
    cmp_.add_argument("--json", action="store_true", help="machine-readable output")
    cmp_.set_defaults(func=_cmd_registry_compare)

