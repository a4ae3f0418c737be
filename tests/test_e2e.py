"""End to end: the full-benchmark flow on the smoke preset in Prefect's test harness.

One run over two synthetic categories (two at a time, in threads) where one test image of
``gravel`` is corrupt: ``weave`` completes (parquet, metrics, report, MLflow parent/child runs,
registered model with aliases), ``gravel`` fails without stopping it and the flow reports the failure. After the image is fixed,
``rerun-categories --failed`` redoes only ``gravel``; a retry of the run then redoes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

RUN_ID = "e2e-run"
CATEGORIES = ["weave", "gravel"]
OVERRIDES = [
    "data.synth.n_train=4", "data.synth.n_test_good=1", "data.synth.n_test_per_defect=1",
    "train.iterations=2", "reconstruct.max_images_per_category=1", "reconstruct.rounds=1",
    "runtime.num_threads=1", "runtime.local_workers=2",
]


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from diffad_core.cli.pipeline import prefect_environment

    prefect_environment()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("e2e")
    paths = {"home": root / "home", "cwd": root / "cwd", "db": root / "store" / "mlflow.db"}
    paths["cwd"].mkdir()
    paths["db"].parent.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFAD_HOME", str(paths["home"]))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{paths['db']}")
        mp.chdir(paths["cwd"])
        yield paths


def _cfg(*extra: str, categories: list[str] = CATEGORIES) -> Any:
    from diffad_core.config import load_config

    return load_config("smoke", overrides=[*OVERRIDES, *extra,
                                           f"data.categories=[{','.join(categories)}]"])


def _status(env: dict[str, Path], category: str, run_id: str = RUN_ID) -> dict[str, Any]:
    return json.loads((env["home"] / "results" / run_id / "status" / f"{category}.json").read_text())


@pytest.fixture(scope="module")
def broken_image(env: dict[str, Path]) -> dict[str, Any]:
    """Generate the data, then corrupt one gravel test image (keeping its bytes to fix it)."""
    from diffad_core.data import resolve_dataset

    root = resolve_dataset(_cfg(), progress=False)
    victim = sorted((root / "gravel" / "test").glob("*/*.png"))[-1]
    original = victim.read_bytes()
    victim.write_bytes(b"this is not a png")
    return {"path": victim, "bytes": original}


@pytest.fixture(scope="module")
def first_run(env: dict[str, Path], broken_image: dict[str, Any]) -> Any:
    from flows.benchmark import full_benchmark

    return full_benchmark(config=_cfg(), run_id=RUN_ID, return_state=True)


def _run_dir(env: dict[str, Path]) -> Path:
    return env["home"] / "results" / RUN_ID


def test_failure_is_isolated_and_reported(env: dict[str, Path], first_run: Any,
                                          broken_image: dict[str, Any]) -> None:
    assert first_run.is_failed()
    assert "1 of 2 categories failed" in first_run.message
    record = json.loads((_run_dir(env) / "run.json").read_text())
    assert record["status"] == "failed" and record["categories"] == CATEGORIES
    assert _status(env, "weave")["status"] == "done"
    assert _status(env, "gravel")["status"] == "failed"
    assert broken_image["path"].name in _status(env, "gravel")["error"]
    from diffad_core import results

    metrics = results.read_metrics(_run_dir(env)).set_index("category")
    assert metrics.loc["weave", "status"] == "ok"
    assert metrics.loc["gravel", "status"] == "missing partition"
    assert 0.0 <= metrics.loc["weave", "pixel_auroc"] <= 1.0
    assert 0.0 <= metrics.loc["weave", "pro"] <= 1.0


def test_parquet_and_report(env: dict[str, Path], first_run: Any) -> None:
    from diffad_core import results

    parts = sorted((_run_dir(env) / "scores" / "category=weave").glob("part-*.parquet"))
    assert parts
    results.validate_score_file(parts[0])
    assert pq.read_table(parts[0]).num_rows > 0
    df = results.read_scores(_run_dir(env), ["weave"])
    assert set(df["run_id"]) == {RUN_ID} and set(df["category"]) == {"weave"}
    assert set(df["label"]) == {0, 1}
    assert df["reconstruction"].notna().sum() == 1  # reconstruct.max_images_per_category=1
    assert df["model_version"].str.startswith("weave@").all()
    report_dir = env["home"] / "reports" / RUN_ID
    text = (report_dir / "report.md").read_text()
    assert "weave" in text and "diffad-synthetic-weave" in text
    assert (report_dir / "report.html").is_file()


def test_mlflow_runs_and_registry(env: dict[str, Path], first_run: Any) -> None:
    from tasks import tracking

    client = tracking.get_client()
    exp = client.get_experiment_by_name("diffad-synthetic")
    assert exp.artifact_location.startswith((env["db"].parent / "mlartifacts").resolve().as_uri())
    runs = client.search_runs([exp.experiment_id], f"tags.diffad_run_id = '{RUN_ID}'")
    parents = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    children = {r.data.tags["category"]: r for r in runs if tracking.PARENT_TAG in r.data.tags}
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FAILED"  # one category failed
    assert set(children) == set(CATEGORIES)
    for child in children.values():
        assert child.data.tags[tracking.PARENT_TAG] == parent.info.run_id
        for tag in ("git_sha", "dataset_manifest_hash", "seed", "config_hash", "preset",
                    "prefect_flow_run_id", "version.torch"):
            assert tag in child.data.tags, tag
    weave = children["weave"]
    assert weave.info.status == "FINISHED" and children["gravel"].info.status == "FAILED"
    assert {"pixel_auroc", "pro", "image_auroc", "train_seconds", "score_ms_per_image"} \
        <= set(weave.data.metrics)
    assert len(client.get_metric_history(weave.info.run_id, "train_loss")) == 2
    assert weave.data.params["train.iterations"] == "2"
    assert "weave.pro" in parent.data.metrics
    # The category's figure is the report's (a few images, then the weakest ones).
    figures = client.list_artifacts(weave.info.run_id, "figures")
    assert [a.path for a in figures] == ["figures/weave.png"] and figures[0].file_size > 0
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in arts

    mv = client.get_model_version_by_alias("diffad-synthetic-weave", "champion")
    assert str(mv.version) == "1" and mv.run_id == weave.info.run_id
    assert mv.tags["promotion_decision"] == "promoted"
    assert str(client.get_model_version_by_alias("diffad-synthetic-weave", "challenger").version) == "1"
    assert not client.search_registered_models("name = 'diffad-synthetic-gravel'")
    assert not (env["cwd"] / "mlruns").exists()


def test_predict_from_the_registry(env: dict[str, Path], first_run: Any,
                                   capsys: pytest.CaptureFixture) -> None:
    """`diffad predict --model models:/...@champion` downloads the registered weights and scores."""
    from diffad_core.cli import main

    image = sorted((env["home"] / "data" / "synthetic" / "weave" / "test").glob("*/000.png"))[0]
    out = env["cwd"] / "pred"
    code = main(["predict", "--checkpoint", "models:/diffad-synthetic-weave@champion", str(image),
                 "--out", str(out)])
    assert code == 0
    assert image.name in capsys.readouterr().out
    assert list(out.glob("*.png"))


def test_prefect_artifacts(env: dict[str, Path], first_run: Any) -> None:
    from prefect.artifacts import Artifact

    key = "diffad-" + RUN_ID
    table = Artifact.get(f"{key}-metrics")
    summary = Artifact.get(f"{key}-summary")
    assert table is not None and "weave" in str(table.data)
    assert summary is not None and "gravel" in str(summary.data) and "failed" in str(summary.data)


def test_rerun_failed_redoes_only_that_category(env: dict[str, Path], first_run: Any,
                                                broken_image: dict[str, Any]) -> None:
    from flows.benchmark import failed_categories, full_benchmark, rerun_categories

    assert failed_categories(RUN_ID) == ["gravel"]
    broken_image["path"].write_bytes(broken_image["bytes"])
    weave_part = _run_dir(env) / "scores" / "category=weave"
    before = {p.name: p.stat().st_mtime_ns for p in weave_part.iterdir()}
    state = rerun_categories(run_id=RUN_ID, failed=True, return_state=True)
    assert state.is_completed(), state.message
    after = {p.name: p.stat().st_mtime_ns for p in weave_part.iterdir()}
    assert after == before  # weave was not redone
    assert (_run_dir(env) / "scores" / "category=gravel").is_dir()
    record = json.loads((_run_dir(env) / "run.json").read_text())
    assert record["status"] == "completed"
    assert {c: _status(env, c)["status"] for c in record["categories"]} == \
        {"weave": "done", "gravel": "done"}
    from diffad_core import results

    metrics = results.read_metrics(_run_dir(env)).set_index("category")
    assert list(metrics.loc[CATEGORIES, "status"]) == ["ok", "ok"]
    from tasks import tracking

    client = tracking.get_client()
    assert str(client.get_model_version_by_alias("diffad-synthetic-gravel", "champion").version) == "1"
    # weave was not registered again
    assert len(client.search_model_versions("name = 'diffad-synthetic-weave'")) == 1

    # A retry of the same run redoes nothing: every category is kept.
    gravel_part = _run_dir(env) / "scores" / "category=gravel"
    gravel_before = {p.name: p.stat().st_mtime_ns for p in gravel_part.iterdir()}
    again = full_benchmark(config=_cfg(), run_id=RUN_ID, return_state=True)
    assert again.is_completed(), again.message
    result = again.result()
    assert all(o.get("reused") for o in result["outcomes"].values())
    assert {p.name: p.stat().st_mtime_ns for p in gravel_part.iterdir()} == gravel_before
    assert not (env["cwd"] / "mlruns").exists()


def test_training_cache_survives_a_new_run(env: dict[str, Path], first_run: Any) -> None:
    """A new run (here with a different category list and other scoring settings) restores
    the trained model from the Prefect cache, scores with its own settings and does not
    register it again; the nightly date changes the key."""
    from diffad_core import results
    from flows.benchmark import full_benchmark
    from tasks import caching, tracking

    first = _status(env, "weave")
    state = full_benchmark(config=_cfg("score.alpha=0.3", categories=["weave"]),
                           run_id="e2e-cache", return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    weave = out["outcomes"]["weave"]
    assert weave["checkpoint_dir"] == first["checkpoint_dir"]
    metrics = results.read_metrics(env["home"] / "results" / "e2e-cache").set_index("category")
    assert metrics.loc["weave", "alpha"] == pytest.approx(0.3)
    child = tracking.get_client().get_run(weave["mlflow_run_id"])
    assert child.data.tags["train_cached"] == "true"
    assert out["registry"]["diffad-synthetic-weave"].startswith("version 1 unchanged")
    assert len(tracking.get_client().search_model_versions("name = 'diffad-synthetic-weave'")) == 1
    dated = caching.train_key(_cfg(categories=["weave"]), ["weave"], first["manifest_hash"], "2030-01-01")
    assert dated != weave["train_key"]
    # A restored result whose checkpoint was deleted since trains again.
    shutil.rmtree(first["checkpoint_dir"])
    state = full_benchmark(config=_cfg(categories=["weave"]), run_id="e2e-cache-2", return_state=True)
    assert state.is_completed(), state.message
    again = state.result()["outcomes"]["weave"]
    assert tracking.get_client().get_run(again["mlflow_run_id"]).data.tags["train_cached"] == "false"
    assert os.path.isfile(os.path.join(first["checkpoint_dir"], "model.safetensors"))


def test_unified_mode_trains_once_and_registers_unified(env: dict[str, Path], first_run: Any,
                                                        broken_image: dict[str, Any]) -> None:
    from diffad_core import results
    from flows.benchmark import full_benchmark
    from tasks import tracking

    broken_image["path"].write_bytes(broken_image["bytes"])
    state = full_benchmark(config=_cfg("mode=unified"), run_id="e2e-unified", return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    assert set(out["registry"]) == {"diffad-synthetic-unified"}
    run_dir = env["home"] / "results" / "e2e-unified"
    df = results.read_scores(run_dir, columns=["category", "model_version"])
    assert set(df["category"]) == set(CATEGORIES)
    assert df["model_version"].str.startswith("unified@").all()
    assert df["model_version"].nunique() == 1  # one model scored every category
    client = tracking.get_client()
    mv = client.get_model_version_by_alias("diffad-synthetic-unified", "champion")
    assert mv.run_id == out["mlflow_parent_run_id"]
    assert len(client.get_metric_history(mv.run_id, "train_loss")) == 2
    assert "unified" in (env["home"] / "reports" / "e2e-unified" / "report.md").read_text()


def test_run_id_is_stable_within_a_flow_run(prefect_harness: None) -> None:
    from prefect import flow

    from tasks.runs import new_run_id

    @flow
    def ids() -> tuple[str, str, str]:
        return new_run_id(), new_run_id(), new_run_id("2030-01-02")

    first, second, dated = ids()
    assert first == second  # a retry of the flow run gets the same run id
    suffix = first.rsplit("-", 1)[1]
    assert len(suffix) == 8 and dated == f"2030-01-02-{suffix}"
    assert new_run_id() != new_run_id()  # outside a flow run: random
