"""Training, checkpoints, exact resume and loading on the smoke preset (CPU, seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffad_core.config import load_config
from diffad_core.diffusion import linear_schedule, training_losses
from diffad_core.data import split_train_validation
from diffad_core.model import load_model
from diffad_core.runtime import DeviceError, amp_dtype, autocast_context, select_device
from diffad_core.train import TrainError, train_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    """A private DIFFAD_HOME holding the smoke preset's synthetic dataset."""
    from diffad_core.data import resolve_dataset

    root = tmp_path_factory.mktemp("diffad_home")
    previous = os.environ.get("DIFFAD_HOME")
    os.environ["DIFFAD_HOME"] = str(root)
    resolve_dataset(load_config("smoke"), progress=False)
    yield root
    if previous is None:
        os.environ.pop("DIFFAD_HOME", None)
    else:
        os.environ["DIFFAD_HOME"] = previous


def _cfg(*overrides: str):
    return load_config("smoke", overrides=["runtime.device=cpu", *overrides])


# ----------------------------------------------------------------------------- device / amp / split
def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="not one of"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            select_device("cuda:1")


def test_amp_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "auto") is None and amp_dtype(cpu, "off") is None
    assert amp_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(DeviceError, match="fp16 needs a CUDA"):
        amp_dtype(cpu, "fp16")
    with autocast_context(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")


def test_split_train_validation_is_deterministic_and_disjoint():
    train, val = split_train_validation(20, 0.1, 0)
    assert len(val) == 2 and len(train) == 18
    assert sorted(set(train) | set(val)) == list(range(20)) and not set(train) & set(val)
    again = split_train_validation(20, 0.1, 0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    explicit = split_train_validation(8, 0.25, 3)
    assert len(explicit[1]) == 2
    assert len(split_train_validation(3, 0.01, 0)[1]) == 1  # at least one when fraction > 0
    assert len(split_train_validation(1, 0.5, 0)[1]) == 0  # never all of them
    assert len(split_train_validation(10, 0.0, 0)[1]) == 0
    with pytest.raises(ValueError, match="fraction"):
        split_train_validation(10, 1.0, 0)


# ----------------------------------------------------------------------------- losses
def test_hybrid_loss_decreases_on_four_fixed_images():
    from diffad_core.nets import FeatureTarget, build_unet

    cfg = _cfg("data.image_size=16")  # 16 px keeps this loop cheap; the maths is size-free
    torch.manual_seed(0)
    target_net = FeatureTarget(cfg.features).eval()
    unet = build_unet(cfg, target_net.channels)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        target = target_net(x0)
    s = linear_schedule()
    t = torch.tensor([0, 10, 300, 900])
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    history = []
    for _ in range(20):
        terms = training_losses(s, unet, x0, t, None, target, noise=noise)
        loss = terms["loss"].mean()
        assert all(torch.isfinite(v).all() for v in terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: v.mean().item() for k, v in terms.items()})
    assert np.mean([h["loss"] for h in history[-3:]]) < 0.7 * np.mean([h["loss"] for h in history[:3]])
    for k in ("mse", "vb", "feature"):  # every term of the hybrid loss goes down
        assert history[-1][k] < history[0][k], k


# ----------------------------------------------------------------------------- train / load
@pytest.fixture(scope="module")
def smoke_run(home: Path, tmp_path_factory: pytest.TempPathFactory):
    """One default smoke-preset training (4 steps), shared by the tests below."""
    logs: list[tuple[int, dict]] = []
    cfg = _cfg()
    out = tmp_path_factory.mktemp("smoke_run") / "ck"
    result = train_model(cfg, ["weave"], out, progress=False, on_log=lambda s, d: logs.append((s, d)))
    return cfg, out, result, logs


def test_training_records_the_transforms_its_images_allow(home: Path, tmp_path: Path):
    # data.augment_dihedral=auto: the test of data/symmetry.py on each category's own training
    # images decides, and the checkpoint records what it allowed (the smoke weave's is asserted
    # against the function itself, not a constant).
    from diffad_core.data import allowed_transforms, prepare_split

    cfg = _cfg("data.augment_dihedral=auto", "train.iterations=2")
    train_model(cfg, ["weave"], tmp_path / "ck", progress=False)
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    expected = list(allowed_transforms(prepare_split(cfg, "weave", "train").images))
    assert meta["dihedral_transforms"] == {"weave": expected}


def test_training_draws_timesteps_up_to_the_cap(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # train.max_timestep: every sample's step uniform over 0..cap of the original chain; without
    # it over the whole chain (the smoke preset's 1000 steps).
    import diffad_core.train as train

    drawn: list[int] = []

    def recording(s, unet, x0, t, *args, **kwargs):  # noqa: ANN001, ANN202
        drawn.extend(int(v) for v in t)
        return training_losses(s, unet, x0, t, *args, **kwargs)

    monkeypatch.setattr(train, "training_losses", recording)
    train_model(_cfg("train.max_timestep=401", "train.iterations=40", "train.batch_size=4"), ["weave"],
                tmp_path / "capped", progress=False)
    assert len(drawn) == 160 and max(drawn) <= 401 and max(drawn) > 300 and min(drawn) < 100
    drawn.clear()
    train_model(_cfg("train.iterations=40", "train.batch_size=4"), ["weave"], tmp_path / "whole", progress=False)
    assert max(drawn) > 401
    # train.scored_step_fraction: about that share exactly at Eq. 11's steps (20, 201 and 401 of
    # the original chain for t = 5, 50, 100 of the 250-step respaced chain), the rest as above.
    drawn.clear()
    train_model(_cfg("train.max_timestep=401", "train.scored_step_fraction=0.5", "train.iterations=60",
                     "train.batch_size=4"), ["weave"], tmp_path / "scored", progress=False)
    at_scored = [v for v in drawn if v in (20, 201, 401)]
    assert len(drawn) == 240 and max(drawn) <= 401 and 90 <= len(at_scored) <= 150
    assert {20, 201, 401} <= set(at_scored)


def test_golden_smoke_losses(smoke_run):
    # Seed 0, smoke preset: depends on the synthetic data, the rotation augmentation, the UNet
    # and feature-target inits and the loss maths. Update only for a deliberate change there.
    _, _, result, _ = smoke_run
    assert sum(v for _, v in result.losses[:3]) == pytest.approx(3.4988388, abs=1e-4)


def test_evaluation_loads_on_the_runs_device(smoke_run):
    # The run's runtime.device, not "auto" (a run asked to score on the CPU, or on a CUDA device
    # this machine lacks, is told so before any work).
    from diffad_core.usecases import load_for_evaluation

    cfg, out, _, _ = smoke_run
    assert load_for_evaluation(out, cfg.with_changes({"runtime": {"device": "cpu"}})).model.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="runtime.device='cuda'"):
            load_for_evaluation(out, cfg.with_changes({"runtime": {"device": "cuda"}}))


def test_train_writes_checkpoint_and_load_round_trips(smoke_run):
    cfg, out, result, logs = smoke_run
    for name in ("model.safetensors", "padim.safetensors", "config.json", "meta.json", "train_state.pt"):
        assert (out / name).is_file(), name
    assert result.steps == cfg.train.iterations == 4
    assert [s for s, _ in result.losses] == [1, 2, 3, 4]
    assert result.final_loss == result.losses[-1][1] and np.isfinite(result.final_loss)
    assert [s for s, _ in logs] == [1, 2, 3, 4]
    assert set(logs[0][1]) == {"loss", "mse", "vb", "feature", "lr"}
    # Linear anneal to 0: lr_i = lr * (1 - i / N) for i = 0..N-1.
    assert [d["lr"] for _, d in logs] == pytest.approx([1e-4, 7.5e-5, 5e-5, 2.5e-5])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["categories"] == ["weave"] and meta["class_index"] == {"weave": 0}
    assert meta["steps"] == 4 and meta["image_size"] == 32
    assert meta["dihedral_transforms"] == {"weave": []}  # data.augment_dihedral=none
    assert {"torch", "timm"} <= set(meta["versions"])

    model = load_model(out, device="cpu")
    assert model.class_index == {"weave": 0} and model.schedule.num_timesteps == 250
    assert model.schedule.timestep_map[5].item() == 20
    assert not model.unet.training
    stored = load_file(str(out / "model.safetensors"))
    state = torch.load(out / "train_state.pt", weights_only=False)
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, stored[k]) and torch.equal(v, state["ema"][k])
    # The EMA differs from the raw weights (ema_rate 0.9 over 4 steps).
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    # The loaded PaDiM is fitted and gives the same map as a fit during training would.
    assert model.padim.fitted
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert model.padim.score_map(x).shape == (1, *model.padim.grid)
    # The loaded feature target is the one the feature head was trained against.
    ft = model.feature_target(x)
    assert ft.shape[1] == meta["feature_channels"]

    # A finished folder is returned as is, without training again.
    before = (out / "model.safetensors").stat().st_mtime_ns
    again = train_model(cfg, ["weave"], out, progress=False)
    assert again.losses == result.losses and again.steps == 4
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(TrainError, match="different config"):
        train_model(_cfg("train.iterations=5"), ["weave"], out, progress=False)

    # resume=False starts over in the same folder, with the new config.
    redo = train_model(_cfg("train.iterations=2"), ["weave"], out, resume=False, progress=False)
    assert redo.steps == 2 and json.loads((out / "meta.json").read_text())["steps"] == 2

    (out / "padim.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"ck has no padim\.safetensors"):
        load_model(out)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_bit_identical(home: Path, tmp_path: Path, workers: int):
    # 6 images, batch 2: the run resumes in the second epoch after its first batch, with
    # rotation on (so the augmentation RNG must be restored, not just replayed).
    cfg = _cfg("train.iterations=6", "train.checkpoint_every=4", "train.log_every=1",
               f"train.num_workers={workers}", "unet.dropout=0.1")  # dropout: the global RNG matters too
    assert cfg.data.augment_rotation
    full = train_model(cfg, ["weave"], tmp_path / "full", progress=False)

    def stop_at_5(step: int, _: dict) -> None:
        if step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_model(cfg, ["weave"], tmp_path / "cut", progress=False, on_log=stop_at_5)
    assert torch.load(tmp_path / "cut" / "train_state.pt", weights_only=False)["step"] == 4
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = train_model(cfg, ["weave"], tmp_path / "cut", progress=False)
    assert resumed.losses == full.losses
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "full" / "train_state.pt", weights_only=False)
    sb = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=False)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_unified_class_conditional_with_held_out_validation(home: Path, tmp_path: Path):
    cfg = _cfg("mode=unified", "unet.class_cond=true", "unet.num_classes=4", "train.iterations=2",
               "score.alpha_per_category=true", "score.validation_fraction=0.34")
    result = train_model(cfg, ["weave", "bolt"], tmp_path / "uni", progress=False)
    meta = json.loads((tmp_path / "uni" / "meta.json").read_text())
    assert meta["class_index"] == {"bolt": 0, "weave": 1}
    n_train = cfg.data.synth.n_train
    expected = split_train_validation(n_train, cfg.score.validation_fraction, cfg.seed)[1].tolist()
    assert meta["held_out"] == {"weave": expected, "bolt": expected} and len(expected) == 2
    assert result.steps == 2
    model = load_model(tmp_path / "uni", device="cpu")
    assert "label_emb.weight" in model.unet.state_dict()
    assert int(model.padim.n_fit) == 2 * (n_train - len(expected))
    with pytest.raises(TrainError, match="per_category trains one category"):
        train_model(_cfg(), ["weave", "bolt"], tmp_path / "bad", progress=False)


def test_training_on_crops_scores_whole_images(home: Path, tmp_path: Path):
    """data.train_crop: the UNet is built for (and trained on) 16 px crops of the 32 px images;
    Eq. 11's maps and Algorithm 1 then run the same weights on the whole image."""
    from diffad_core.data import prepare_split
    from diffad_core.reconstruct import gradient_denoise
    from diffad_core.score import component_maps

    cfg = _cfg("data.train_crop=16", "train.iterations=2")
    seen: list[tuple[int, ...]] = []
    train_model(cfg, ["weave"], tmp_path / "crop", progress=False)
    model = load_model(tmp_path / "crop", device="cpu")
    assert model.unet.image_size == 16 and model.cfg.data.image_size == 32
    model.unet.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    images = torch.from_numpy(prepare_split(model.cfg, "weave", "test").images[:2])
    maps = component_maps(model, images, "weave", model.cfg.score, torch.Generator().manual_seed(0))
    assert maps.kl.shape == maps.feature.shape == (2, 32, 32)
    assert torch.isfinite(maps.kl).all() and torch.isfinite(maps.feature).all()
    recon = gradient_denoise(model, images[:1], model.cfg.reconstruct, category="weave")
    assert recon.shape == (1, 3, 32, 32)
    assert seen and all(s == (32, 32) for s in seen)


def _record_feature_target_shapes(mp: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Patch FeatureTarget.forward to record (input H, W, output grid h, w) of every call."""
    from diffad_core.nets.features import FeatureTarget

    seen: list[tuple[int, ...]] = []
    original = FeatureTarget.forward

    def recording(self, x, size=None):
        out = original(self, x, size)
        seen.append((*x.shape[-2:], *out.shape[-2:]))
        return out

    mp.setattr(FeatureTarget, "forward", recording)
    return seen


def test_feature_target_at_a_larger_size_is_trained_and_scored_there(home: Path, tmp_path: Path):
    """features.image_size: the UNet sees 32 px images, the feature target the same images at
    48 px (training, calibration, scoring and predict), compared on the UNet's 8x8 grid."""
    import io

    from PIL import Image

    from diffad_core.data import prepare_split
    from diffad_core.score import component_maps, score_split
    from diffad_core.usecases import EvaluationModel, predict_images
    from diffad_core.validation import calibrate

    cfg = _cfg("features.image_size=48", "train.iterations=2", "score.calibrate_maps=true")
    with pytest.MonkeyPatch.context() as mp:
        seen = _record_feature_target_shapes(mp)
        train_model(cfg, ["weave"], tmp_path / "f48", progress=False)
        assert seen and all(s == (48, 48, 8, 8) for s in seen)  # training: 48 px in, H/4 of 32 out
        model = load_model(tmp_path / "f48", device="cpu")
        test = prepare_split(model.cfg, "weave", "test")
        assert test.images.shape[-1] == 32 and test.feature_images.shape[-1] == 48
        images = torch.from_numpy(test.images[:2])
        with pytest.raises(ValueError, match="48 px"):
            component_maps(model, images, "weave", model.cfg.score, torch.Generator().manual_seed(0))
        seen.clear()
        cal = calibrate(model, model.cfg, "weave")
        records = list(score_split(model, test, model.cfg.score, alpha=0.5, calibration=cal, progress=False))
        assert seen and all(s[:2] == (48, 48) for s in seen)
    assert cal.n_images >= 1 and cal.feature_std > 0
    assert len(records) == len(test) and all(np.isfinite(r.anomaly_map).all() for r in records)
    assert records[0].feature_map.shape == (32, 32)
    # The same maps from the 48 px input as the target's input: not those of the 32 px images.
    big = torch.from_numpy(test.feature_images[:2])
    maps = component_maps(model, images, "weave", model.cfg.score, torch.Generator().manual_seed(0),
                          feature_images=big)
    assert not torch.allclose(maps.feature, component_maps(
        model, images, "weave", model.cfg.score, torch.Generator().manual_seed(0),
        feature_images=F.interpolate(images, size=48, mode="bilinear")).feature)
    buf = io.BytesIO()
    Image.fromarray(((test.feature_images[0].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)).save(buf, "PNG")
    ev = EvaluationModel(model=model, cfg=model.cfg, checkpoint=tmp_path / "f48")
    predicted = predict_images(ev, "weave", [buf.getvalue()])
    assert predicted.anomaly_maps.shape == (1, 32, 32) and np.isfinite(predicted.image_scores).all()


def test_feature_head_on_the_half_resolution_level(home: Path, tmp_path: Path):
    """unet.feature_stride=2: the head reads the decoder level at H/2, and the target is pooled
    to that grid in training and scoring (16x16 for 32 px images, instead of 8x8)."""
    from diffad_core.data import prepare_split
    from diffad_core.score import component_maps

    cfg = _cfg("unet.feature_stride=2", "features.image_size=48", "train.iterations=2")
    with pytest.MonkeyPatch.context() as mp:
        seen = _record_feature_target_shapes(mp)
        train_model(cfg, ["weave"], tmp_path / "s2", progress=False)
        grids = [s[2:] for s in seen]
        assert grids and set(grids) == {(16, 16)}
        model = load_model(tmp_path / "s2", device="cpu")
        test = prepare_split(model.cfg, "weave", "test")
        images, big = torch.from_numpy(test.images[:2]), torch.from_numpy(test.feature_images[:2])
        _, feat = model.unet(images, torch.zeros(2, dtype=torch.long))
        assert feat.shape[-2:] == (16, 16)
        seen.clear()
        maps = component_maps(model, images, "weave", model.cfg.score, torch.Generator().manual_seed(0),
                              feature_images=big)
    assert {s[2:] for s in seen} == {(16, 16)} and maps.feature.shape == (2, 32, 32)
    assert torch.isfinite(maps.feature).all()
    with pytest.raises(ValueError, match="feature_stride"):
        load_config("smoke", overrides=["unet.feature_stride=3"])


def test_training_fine_tunes_from_an_adm_checkpoint(home: Path, tmp_path: Path):
    """train.init_checkpoint: every tensor but the label embedding and the feature head is
    loaded from the file (OpenAI's layout), the report lands in the result and meta.json, and a
    file that does not match is a clear error, not a partial load."""
    from diffad_core.nets import build_unet
    from diffad_core.nets.adm_init import AdmInitError

    cfg = _cfg("unet.class_cond=true", "unet.num_classes=2", "train.iterations=1")
    torch.manual_seed(1)
    donor = {k: v for k, v in build_unet(cfg, 64).state_dict().items() if not k.startswith("feature_head")}
    donor["label_emb.weight"] = torch.zeros(1000, donor["label_emb.weight"].shape[1])
    path = tmp_path / "adm.pt"
    torch.save(donor, path)
    result = train_model(cfg, ["weave"], tmp_path / "ft", progress=False, init_weights=path)
    assert any("initialised" in line for line in result.init_report)
    assert json.loads((tmp_path / "ft" / "meta.json").read_text())["init_report"] == result.init_report

    broken = dict(donor)
    broken["input_blocks.0.0.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(AdmInitError, match="input_blocks.0.0.weight"):
        train_model(cfg, ["weave"], tmp_path / "bad", progress=False, init_weights=tmp_path / "broken.pt")


def test_batches_come_in_pinned_memory_only_for_cuda(monkeypatch) -> None:
    """Issue #11: on CUDA the loader pins its batches (the host-to-device copy then overlaps the
    step before it); on a CPU pinning would only cost time."""
    import diffad_core.train as train

    cfg = load_config("smoke")
    data = torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4))
    assert train._epoch_loader(data, cfg, seed=0, epoch=0).pin_memory is False
    monkeypatch.setattr(train, "select_device", lambda spec: torch.device("cuda"))
    assert train._epoch_loader(data, cfg, seed=0, epoch=0).pin_memory is True
