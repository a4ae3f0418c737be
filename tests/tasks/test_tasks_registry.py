"""Model registry: promotion rule, challenger/champion aliases both ways, compare, models:/ URIs."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffad_core.config import load_config
from tasks import registry, tracking
from tests.tasks.conftest import make_checkpoint


@pytest.mark.parametrize(("challenger", "champion", "promoted"), [
    ({"pro": 0.80, "pixel_auroc": 0.90}, None, True),
    ({"pro": 0.80, "pixel_auroc": 0.90}, {"pro": 0.80, "pixel_auroc": 0.90}, True),
    ({"pro": 0.797, "pixel_auroc": 0.90}, {"pro": 0.80, "pixel_auroc": 0.90}, True),  # within tol
    ({"pro": 0.79, "pixel_auroc": 0.95}, {"pro": 0.80, "pixel_auroc": 0.90}, False),  # PRO worse
    ({"pro": 0.90, "pixel_auroc": 0.89}, {"pro": 0.80, "pixel_auroc": 0.90}, False),  # AUROC worse
    ({"pixel_auroc": 0.99}, {"pro": 0.80, "pixel_auroc": 0.90}, False),  # no PRO
])
def test_decide(challenger: dict, champion: dict | None, promoted: bool) -> None:
    ok, reason = registry.decide(challenger, champion, tolerance=0.005)
    assert ok is promoted, reason


def test_promotion_both_ways_and_compare(home: Path, tmp_path: Path) -> None:
    cfg = load_config("smoke")
    name = registry.model_name("synthetic", "weave")
    versions = []
    decisions = []
    for i, metrics in enumerate([
        {"pro": 0.60, "pixel_auroc": 0.80, "image_auroc": 0.7},   # first: no champion -> promoted
        {"pro": 0.70, "pixel_auroc": 0.85, "image_auroc": 0.8},   # better -> promoted
        {"pro": 0.50, "pixel_auroc": 0.86, "image_auroc": 0.9},   # worse PRO -> stays challenger
    ]):
        run = tracking.start_run(cfg, f"weave-{i}", {})
        ckpt = make_checkpoint(tmp_path / f"ckpt{i}", payload=f"w{i}".encode())
        version = registry.register_checkpoint(run, ckpt, name, metrics)
        versions.append(version)
        decisions.append(registry.promote(name, version, tolerance=0.005))
    assert versions == ["1", "2", "3"]
    assert [d.promoted for d in decisions] == [True, True, False]
    assert decisions[2].champion_version == "2"
    client = tracking.get_client()
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "3"
    v3 = client.get_model_version(name, "3")
    assert v3.tags["promotion_decision"] == "kept_challenger"
    assert "pro" in v3.tags["promotion_reason"]
    assert client.get_model_version(name, "2").tags["promotion_decision"] == "promoted"

    assert registry.find_version(name, "metric.pro", "0.700000") == "2"
    assert registry.find_version(name, "metric.pro", "0.123") is None
    assert registry.find_version("diffad-synthetic-none", "x", "y") is None

    rows = registry.compare("synthetic")
    assert rows == [{
        "model": name, "champion_version": "2", "champion_pixel_auroc": 0.85, "champion_pro": 0.7,
        "champion_image_auroc": 0.8, "challenger_version": "3", "challenger_pixel_auroc": 0.86,
        "challenger_pro": 0.5, "challenger_image_auroc": 0.9, "decision": "kept_challenger",
    }]
    text = registry.format_comparison(rows)
    assert "diffad-synthetic-weave" in text and "kept_challenger" in text

    # models:/ URIs download the registered files (alias and version forms).
    champ = registry.resolve_models_uri(f"models:/{name}@champion")
    assert (champ / "model.safetensors").read_bytes() == b"w1"
    assert sorted(p.name for p in champ.iterdir()) == sorted(registry.CHECKPOINT_FILES)
    assert (registry.resolve_models_uri(f"models:/{name}/3") / "model.safetensors").read_bytes() == b"w2"
    with pytest.raises(FileNotFoundError, match="not in the registry"):
        registry.resolve_models_uri("models:/diffad-synthetic-nothing@champion")
    assert not (Path.cwd() / "mlruns").exists()


def test_promotion_can_be_disabled(home: Path, tmp_path: Path) -> None:
    cfg = load_config("smoke")
    name = registry.model_name("synthetic", "unified")
    run = tracking.start_run(cfg, "u", {})
    version = registry.register_checkpoint(run, make_checkpoint(tmp_path / "c"), name,
                                           {"pro": 0.5, "pixel_auroc": 0.5})
    decision = registry.promote(name, version, tolerance=0.0, apply=False)
    assert not decision.promoted and "promotion disabled" in decision.reason
    client = tracking.get_client()
    assert str(client.get_model_version_by_alias(name, "challenger").version) == version
    with pytest.raises(Exception):
        client.get_model_version_by_alias(name, "champion")


def test_register_rejects_incomplete_checkpoint(home: Path, tmp_path: Path) -> None:
    cfg = load_config("smoke")
    run = tracking.start_run(cfg, "x", {})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        registry.register_checkpoint(run, empty, "diffad-synthetic-x", {})
