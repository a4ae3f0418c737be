"""Cache keys and the retry rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prefect.states import Failed

from diffad_core.config import ConfigError, load_config
from diffad_core.data import DataError
from diffad_core.model import checkpoint_dir
from tasks import caching


def test_train_key_depends_on_what_changes_the_model() -> None:
    cfg = load_config("smoke")
    base = caching.train_key(cfg, ["weave"], "m1", None)
    assert base == caching.train_key(cfg, ["weave"], "m1", None)
    assert base != caching.train_key(cfg, ["gravel"], "m1", None)
    assert base != caching.train_key(cfg, ["weave"], "m2", None)
    assert base != caching.train_key(cfg, ["weave"], "m1", "2026-01-01")
    assert base != caching.train_key(load_config("smoke", overrides=["train.iterations=5"]),
                                     ["weave"], "m1", None)
    assert base != caching.train_key(load_config("smoke", overrides=["score.alpha_per_category=true"]),
                                     ["weave"], "m1", None)  # it holds out training images
    # Where and how it runs, and how it is scored or reconstructed, does not retrain.
    same = load_config("smoke", overrides=["runtime.num_threads=1", "runtime.device=cpu",
                                           "runtime.executor=deployments", "score.alpha=0.3",
                                           "reconstruct.rounds=9"])
    assert base == caching.train_key(same, ["weave"], "m1", None)


def test_code_version_has_source_hash() -> None:
    version = caching.code_version()
    assert "+src." in version and len(caching.source_hash()) == 12


def test_cache_key_and_checkpoint_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFAD_HOME", str(tmp_path))
    cfg = load_config("smoke")
    params = {"cfg": cfg, "categories": ["weave"], "label": "weave", "manifest_hash": "m",
              "date": None}
    key = caching.train_key(cfg, ["weave"], "m", None)
    assert caching.train_cache_key(None, params) == f"train-weave-{key}"
    assert caching.train_cache_key(None, {**params, "date": "2030-01-01"}) != f"train-weave-{key}"
    assert checkpoint_dir(cfg, "weave", key) == \
        tmp_path.resolve() / "checkpoints" / "synthetic" / "weave" / key
    assert caching.result_storage_path() == tmp_path.resolve() / "prefect-results"


@pytest.mark.parametrize(("exc", "transient"), [
    (ConfigError("bad key"), False),
    (ValueError("bad value"), False),
    (FileNotFoundError("data/x.png"), False),
    (torch.OutOfMemoryError("CUDA out of memory"), False),
    (RuntimeError("CUDA out of memory. Tried to allocate"), False),
    (DataError("x.png: unreadable image"), False),
    (ConnectionError("reset by peer"), True),
    (TimeoutError("slow server"), True),
    (OSError("Input/output error"), True),
    (RuntimeError("NCCL timeout"), True),
])
def test_retry_only_transient(exc: BaseException, transient: bool) -> None:
    assert caching.is_transient(exc) is transient
    assert caching.retry_condition(None, None, Failed(data=exc)) is transient
