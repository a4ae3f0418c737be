"""bench/bench_train_score.py (issue #11): one JSON line per run with rates, memory and MFU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_train_score.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_train_score", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_table_picks_the_longest_matching_name() -> None:
    bench = _module()
    assert bench.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert bench.peak_tflops("cpu", "fp32") is None


@pytest.mark.slow
def test_smoke_run_appends_one_json_line(tmp_path, monkeypatch, one_thread) -> None:
    monkeypatch.setenv("DIFFAD_HOME", str(tmp_path / "home"))  # the script sets its own; restored after
    results = tmp_path / "results.jsonl"
    results.write_text('{"earlier": 1}\n')
    assert _module().main(["--preset", "smoke", "--steps", "2", "--recon-images", "2",
                           "--results", str(results)]) == 0
    lines = results.read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[1])
    for key in ("train_steps_per_s", "score_images_per_s", "reconstruct_images_per_s"):
        assert record[key] > 0
    assert record["device"] == "cpu" and record["mfu"] == {"train": None, "score": None, "reconstruct": None}
    assert all(v > 0 for v in record["flops_per_unit"].values())
    assert record["achieved_tflops"]["score"] == pytest.approx(
        record["score_images_per_s"] * record["flops_per_unit"]["scored_image"] / 1e12)
    assert record["peak_memory_kind"] == "process_max_rss" and record["peak_memory_gib"]["train"] > 0
