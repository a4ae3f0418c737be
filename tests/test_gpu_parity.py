"""bench/gpu_parity.py: one model, the same images scored on two devices / precisions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_parity.py"


@pytest.mark.slow
def test_cpu_rows_compare_fp32_with_bf16(tmp_path, monkeypatch, capsys, one_thread) -> None:
    monkeypatch.setenv("DIFFAD_HOME", str(tmp_path / "home"))  # the script sets its own; restored after
    spec = importlib.util.spec_from_file_location("gpu_parity", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "parity.txt"
    assert module.main(["--preset", "smoke", "--steps", "2", "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["run"]: r for r in record["rows"]}
    if record["device"].startswith("no CUDA"):
        assert set(rows) == {"cpu fp32", "cpu bf16"}
    ref, bf16 = rows["cpu fp32"], rows["cpu bf16"] if "cpu bf16" in rows else rows["cuda bf16"]
    assert all(ref[k] == 0.0 for k in ("anomaly_map", "kl_map", "feature_map", "image_score"))
    # bf16 autocast moves the maps, by a little: the UNet really ran in another precision.
    assert 0.0 < bf16["anomaly_map"] < 0.2
    assert abs(bf16["pixel_auroc"] - ref["pixel_auroc"]) < 0.05
    assert "| cpu fp32 | 0.00e+00 |" in out.read_text()
