"""Model registry: promotion rule, challenger/champion aliases both ways, compare, models:/ URIs,
dataset ids in model names, the same-test-set rule, versions registered before the pyfunc model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from diffad_core.cli import main
from diffad_core.config import load_config
from diffad_core.data import resolve_dataset
from tasks import pipeline, registry, tracking  # pipeline (Prefect) first: it sets up logging
from tasks.records import CategoryMetrics
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


SAME_TEST_SET = {registry.TEST_MANIFEST_TAG: "a" * 64}


def test_promotion_both_ways_and_compare(home: Path, tmp_path: Path) -> None:
    cfg = load_config("smoke")
    name = registry.model_name(cfg, "weave")
    assert name == "diffad-synthetic-weave"
    versions = []
    decisions = []
    for i, metrics in enumerate([
        {"pro": 0.60, "pixel_auroc": 0.80, "image_auroc": 0.7},   # first: no champion -> promoted
        {"pro": 0.70, "pixel_auroc": 0.85, "image_auroc": 0.8},   # better -> promoted
        {"pro": 0.50, "pixel_auroc": 0.86, "image_auroc": 0.9},   # worse PRO -> stays challenger
    ]):
        run = tracking.start_run(cfg, f"weave-{i}", {})
        ckpt = make_checkpoint(tmp_path / f"ckpt{i}", payload=f"w{i}".encode())
        version = registry.register_checkpoint(run, ckpt, name, metrics, tags=SAME_TEST_SET)
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
    name = registry.model_name(cfg, "unified")
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


def test_model_names_carry_the_dataset_identity(tmp_path: Path) -> None:
    """Two folder datasets with a ``weave`` category never share a model (issue #10 item 6)."""
    synthetic = load_config("smoke")
    assert registry.model_name(synthetic, "weave") == "diffad-synthetic-weave"
    a = load_config("smoke", overrides=["data.dataset=folder", f"data.root={tmp_path / 'plant-a' / 'data'}"])
    b = load_config("smoke", overrides=["data.dataset=folder", f"data.root={tmp_path / 'plant-b' / 'data'}"])
    name_a, name_b = registry.model_name(a, "weave"), registry.model_name(b, "weave")
    assert name_a != name_b
    assert name_a.startswith("diffad-folder-data-") and name_a.endswith("-weave")
    assert registry.model_name(a, "weave") == name_a  # stable
    named = load_config("smoke", overrides=["data.dataset=folder", "data.name=plant-a"])
    assert registry.model_name(named, "weave") == "diffad-folder-plant-a-weave"
    assert registry.model_name(named, "unified") == "diffad-folder-plant-a-unified"


def test_champion_of_another_test_set_is_not_compared(home: Path, tmp_path: Path) -> None:
    """A challenger measured on another test manifest is never promoted over the champion, however
    good its numbers; the decision says so. On the same manifest the usual rule applies."""
    cfg = load_config("smoke")
    name = registry.model_name(cfg, "weave")
    manifest_a = {registry.TEST_MANIFEST_TAG: "a" * 64}
    manifest_b = {registry.TEST_MANIFEST_TAG: "b" * 64}
    decisions = []
    for i, (metrics, tags) in enumerate([
        ({"pro": 0.50, "pixel_auroc": 0.70}, manifest_a),   # first: champion
        ({"pro": 0.99, "pixel_auroc": 0.99}, manifest_b),   # better, other test set: not compared
        ({"pro": 0.99, "pixel_auroc": 0.99}, {}),           # test set unknown: not compared
        ({"pro": 0.60, "pixel_auroc": 0.80}, manifest_a),   # better, same test set: promoted
    ]):
        run = tracking.start_run(cfg, f"weave-{i}", {})
        version = registry.register_checkpoint(run, make_checkpoint(tmp_path / f"c{i}"), name,
                                               metrics, tags=tags)
        decisions.append(registry.promote(name, version, tolerance=0.005))
    assert [d.decision for d in decisions] == ["promoted", "not_compared", "not_compared", "promoted"]
    assert [d.promoted for d in decisions] == [True, False, False, True]
    assert "another test set" in decisions[1].reason and "not promoted" in decisions[1].reason
    assert "challenger's test set is unknown" in decisions[2].reason
    client = tracking.get_client()
    assert client.get_model_version(name, "2").tags["promotion_decision"] == "not_compared"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "4"


def test_versions_registered_before_stay_readable(home: Path, tmp_path: Path) -> None:
    """A version written the old way (plain ``checkpoint/`` run artifacts, no MLmodel) still
    resolves to its files, shows in ``compare``, and a new version is not compared with it (its
    test set is unknown)."""
    cfg = load_config("smoke")
    name = registry.model_name(cfg, "weave")
    client = tracking.get_client()
    old_run = tracking.start_run(cfg, "old", {})
    ckpt = make_checkpoint(tmp_path / "old", payload=b"old weights")
    for fname in registry.CHECKPOINT_FILES:
        client.log_artifact(old_run, str(ckpt / fname), "checkpoint")
    client.create_registered_model(name)
    source = f"{client.get_run(old_run).info.artifact_uri}/checkpoint"
    old = client.create_model_version(name, source=source, run_id=old_run,
                                      tags={"metric.pro": "0.5", "metric.pixel_auroc": "0.7"})
    client.set_registered_model_alias(name, "champion", old.version)

    folder = registry.resolve_models_uri(f"models:/{name}@champion")
    assert (folder / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in folder.iterdir()) == sorted(registry.CHECKPOINT_FILES)

    run = tracking.start_run(cfg, "new", {})
    new = registry.register_checkpoint(run, make_checkpoint(tmp_path / "new", payload=b"new"), name,
                                       {"pro": 0.9, "pixel_auroc": 0.9}, tags=SAME_TEST_SET)
    decision = registry.promote(name, new, tolerance=0.005)
    assert decision.decision == "not_compared" and "champion's test set is unknown" in decision.reason
    assert (registry.resolve_models_uri(f"models:/{name}/{new}") / "model.safetensors").read_bytes() == b"new"
    [row] = registry.compare("synthetic", ["weave"])
    assert row["champion_version"] == "1" and row["champion_pro"] == 0.5
    assert row["challenger_version"] == "2" and row["decision"] == "not_compared"


def test_promote_by_hand_replaces_a_champion_that_cannot_be_compared(
        home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An old champion with no test manifest tag is never replaced by the automatic rule;
    ``diffad registry promote`` replaces it, records why, and the next version is compared with
    the new champion as usual. A version that does not exist is a one-line error."""
    cfg = load_config("smoke")
    name = registry.model_name(cfg, "weave")
    versions = []
    for i, tags in enumerate([{}, SAME_TEST_SET, SAME_TEST_SET]):
        run = tracking.start_run(cfg, f"weave-{i}", {})
        versions.append(registry.register_checkpoint(run, make_checkpoint(tmp_path / f"c{i}"), name,
                                                     {"pro": 0.5 + i / 10, "pixel_auroc": 0.8},
                                                     tags=tags))
        if i < 2:
            registry.promote(name, versions[-1], tolerance=0.005)
    client = tracking.get_client()
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"  # not compared

    assert main(["registry", "promote", name, "2", "--reason", "old champion has no test set"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name}: version 2 is champion (champion was version 1)")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion_decision"] == "promoted_by_hand"
    assert tags["promotion_reason"] == "promoted by hand: old champion has no test set"
    assert registry.promote(name, versions[2], tolerance=0.005).decision == "promoted"  # compared

    assert main(["registry", "promote", name, "9", "--reason", "x"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no version 9 of model '{name}' at "
                                                    f"{tracking.tracking_uri()}")


def test_test_set_hash_follows_test_images_and_masks_only(home: Path) -> None:
    """The manifest a version's metrics were measured on: its category's test images and masks
    (a changed training image keeps it, a changed test image or mask changes it)."""
    manifest_hash_of_test_set = pipeline.manifest_hash_of_test_set
    cfg = load_config("smoke", overrides=["data.categories=[weave,gravel]",
                                          "data.synth.categories=[weave,gravel]"])
    root = resolve_dataset(cfg, progress=False)
    weave = manifest_hash_of_test_set(cfg, ["weave"])
    assert weave != manifest_hash_of_test_set(cfg, ["gravel"])
    assert manifest_hash_of_test_set(cfg, ["weave", "gravel"]) not in (weave, None)

    def touched(path: Path) -> str:
        original = path.read_bytes()
        path.write_bytes(original + b"\0")
        try:
            return manifest_hash_of_test_set(cfg, ["weave"])
        finally:
            path.write_bytes(original)

    assert touched(sorted((root / "weave" / "train" / "good").glob("*.png"))[0]) == weave
    assert touched(sorted((root / "weave" / "test").glob("*/*.png"))[0]) != weave
    assert touched(sorted((root / "weave" / "ground_truth").glob("*/*.png"))[0]) != weave
    assert manifest_hash_of_test_set(cfg, ["weave"]) == weave


def test_register_task_compares_only_on_the_same_test_set(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The register task tags each version with its test set's manifest: a better challenger on
    the same test set is promoted; after a test image changed it is not compared, and the task
    says so in its log."""
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: logging.getLogger("register-test"))
    cfg = load_config("smoke", overrides=["data.categories=[weave]", "data.synth.categories=[weave]"])
    root = resolve_dataset(cfg, progress=False)

    def register(i: int, pro: float) -> object:
        run = tracking.start_run(cfg, f"weave-{i}", {})
        return pipeline.register_task.fn(cfg, run, str(make_checkpoint(tmp_path / f"c{i}")), "weave",
                                         CategoryMetrics(category="weave", pro=pro, pixel_auroc=0.9),
                                         f"run-{i}")

    assert register(0, 0.5).promoted
    assert register(1, 0.6).promoted  # same test set, better
    image = sorted((root / "weave" / "test").glob("*/*.png"))[0]
    image.write_bytes(image.read_bytes() + b"\0")
    with caplog.at_level(logging.WARNING, logger="register-test"):
        third = register(2, 0.9)
    assert not third.promoted and "another test set" in third.reason
    assert "not compared with champion version 2" in caplog.text
    assert "diffad registry promote diffad-synthetic-weave 3 --reason" in caplog.text
    client = tracking.get_client()
    tags = [client.get_model_version("diffad-synthetic-weave", v).tags for v in ("1", "2", "3")]
    assert tags[0][registry.TEST_MANIFEST_TAG] == tags[1][registry.TEST_MANIFEST_TAG]
    assert tags[2][registry.TEST_MANIFEST_TAG] == pipeline.manifest_hash_of_test_set(cfg, ["weave"])
    assert tags[2]["promotion_decision"] == "not_compared" and tags[2]["dataset_id"] == "synthetic"
