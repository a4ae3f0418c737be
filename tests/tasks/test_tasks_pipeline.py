"""The report title says which computation and which sizes a run's numbers come from."""

from __future__ import annotations

from diffad_core.config import load_config
from tasks.pipeline import _computation


def test_report_title_names_the_computation_and_the_sizes() -> None:
    assert _computation(load_config("paper")) == "the official code's computation"
    cpu = load_config("cpu", overrides=["data.image_size=64", "features.image_size=256"])
    assert _computation(cpu) == ("refined scoring, maps calibrated on held-out normals, feature residual "
                                 "whitened (full); feature target on 256 px images, UNet and PaDiM on 64 px")
    calibrated_paper = load_config("paper", overrides=["score.calibrate_maps=true"])
    assert _computation(calibrated_paper) == "the official code's computation, maps calibrated on held-out normals"
    assert "feature target" not in _computation(load_config("cpu-demo"))
