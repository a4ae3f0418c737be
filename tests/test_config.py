import pytest

from diffad_core.config import PRESETS, ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    assert config_from_dict(cfg.to_dict()) == cfg


def test_paper_preset_is_the_method():
    cfg = load_config("paper")
    assert cfg.data.image_size == 256
    assert cfg.unet.channel_mult == [1, 1, 2, 2, 4, 4]
    assert cfg.unet.attention_resolutions == [32, 16, 8]
    assert cfg.diffusion.score_timesteps == [5, 50, 100]
    assert cfg.train.iterations == 10_000 and cfg.train.batch_size == 2
    assert cfg.score.alpha == 0.5


def test_paper_preset_is_the_official_run():
    """Issue #7: every official quirk is on in paper (and unified), off in refined."""
    for preset in ("paper", "unified"):
        cfg = load_config(preset)
        assert cfg.features.weights.timm_name == "tf_efficientnet_b4.aa_in1k"
        assert not cfg.features.imagenet_norm and cfg.features.static_same_padding == 380
        assert cfg.unet.feature_tap == "before_last" and cfg.train.init_checkpoint == "openai-adm-256"
        assert not cfg.data.augment_rotation
        s = cfg.score
        assert s.feature_map_size == 16 and s.official_timestep_quirk and s.kl_unbiased_std
        assert s.amp == "off" and s.ablations == ["grid_h4", "single_pass"]
    refined = load_config("refined")
    assert refined.model_definition()["unet"] == load_config("paper").model_definition()["unet"]
    assert refined.data.augment_rotation and refined.features.imagenet_norm
    assert refined.features.static_same_padding is None
    s = refined.score
    assert s.feature_map_size is None and not s.official_timestep_quirk and not s.kl_unbiased_std
    assert refined.train.init_checkpoint == "openai-adm-256"


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="unknown key 'train.iteratons'"):
        load_config("smoke", overrides=["train.iteratons=3"])


def test_set_override_parses_yaml_values():
    cfg = load_config("smoke", overrides=["train.iterations=7", "unet.channel_mult=[1,2]",
                                          "data.categories=[weave]"])
    assert cfg.train.iterations == 7
    assert cfg.data.categories == ["weave"]


def test_on_and_off_stay_strings_in_yaml(tmp_path):
    # YAML 1.1 reads a bare on / off as a bool; `--set runtime.channels_last=on` and
    # `--set score.amp=off` failed before. Bool settings still take on / off / yes / no.
    for raw, value in (("on", "on"), ("off", "off"), ("auto", "auto"), ('"on"', "on")):
        assert load_config("smoke", overrides=[f"runtime.channels_last={raw}"]).runtime.channels_last == value
    assert load_config("smoke", overrides=["score.amp=off"]).score.amp == "off"
    with pytest.raises(ConfigError, match="runtime.channels_last"):
        load_config("smoke", overrides=["runtime.channels_last=sideways"])
    for raw, value in (("true", True), ("False", False), ("on", True), ("no", False)):
        assert load_config("smoke", overrides=[f"runtime.compile_unet={raw}"]).runtime.compile_unet is value
    f = tmp_path / "c.yaml"
    f.write_text("score:\n  amp: off\nruntime:\n  channels_last: on\n  compile_unet: yes\n")
    cfg = load_config("smoke", f)
    assert (cfg.score.amp, cfg.runtime.channels_last, cfg.runtime.compile_unet) == ("off", "on", True)


def test_yaml_file_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  iterations: 9\nscore:\n  alpha: 0.3\n")
    cfg = load_config("smoke", f, ["score.alpha=0.7"])
    assert cfg.train.iterations == 9 and cfg.score.alpha == 0.7


def test_bad_values_and_presets():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nope")
    with pytest.raises(ConfigError, match="score.alpha"):
        load_config("smoke", overrides=["score.alpha=2"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("smoke", "/nonexistent.yaml")
    with pytest.raises(ConfigError, match="divisible"):
        load_config("paper", overrides=["data.image_size=100"])


def test_config_hash_changes_with_content():
    a = load_config("smoke")
    b = load_config("smoke", overrides=["seed=1"])
    assert a.config_hash() != b.config_hash()
    assert a.config_hash() == load_config("smoke").config_hash()


def test_model_hash_ignores_evaluation_settings():
    base = load_config("smoke")
    for same in (["score.alpha=0.3"], ["reconstruct.rounds=9"], ["runtime.device=cpu"],
                 ["registry.tolerance=0.1"], ["metrics.pro_fpr_limit=0.2"]):
        assert load_config("smoke", overrides=same).model_hash() == base.model_hash(), same
    for other in (["train.iterations=5"], ["seed=3"], ["unet.base_channels=32"],
                  ["score.alpha_per_category=true"], ["data.image_size=64"]):
        assert load_config("smoke", overrides=other).model_hash() != base.model_hash(), other


def test_models_trained_before_augment_dihedral_keep_their_hash():
    # Golden hashes computed by the code of 2026-12-07 before data.augment_dihedral existed
    # (commit 33a01bd): at "none" the key is left out of the model definition.
    golden = {"paper": "efdf05547f2858a4", "cpu": "a515b98b75a9940f", "smoke": "2a8eaf26939d7fba",
              "cpu-demo": "9799c20e47fdcf4a"}
    # The cpu preset's budget then was 25 minutes (30 since round eighteen, a new model), and it
    # trained over the whole chain (train.max_timestep, round twenty-two: also left out when null).
    then = {"cpu": ["auto.time_budget_minutes=25", "train.max_timestep=null"]}
    for preset, digest in golden.items():
        overrides = ["data.augment_dihedral=none", *then.get(preset, [])]
        assert load_config(preset, overrides=overrides).model_hash() == digest, preset
    assert load_config("cpu", overrides=["data.augment_dihedral=auto", *then["cpu"]]).model_hash() != golden["cpu"]
    assert load_config("cpu").model_hash() != golden["cpu"]


def test_with_evaluation_settings_keeps_the_model_part():
    trained = load_config("smoke", overrides=["score.alpha_per_category=true", "train.iterations=5"])
    run = load_config("smoke", overrides=["score.alpha=0.2", "reconstruct.rounds=7"])
    merged = trained.with_evaluation_settings(run)
    assert merged.score.alpha == 0.2 and merged.reconstruct.rounds == 7
    assert merged.train.iterations == 5 and merged.score.alpha_per_category is True
    assert merged.model_hash() == trained.model_hash()


def test_override_merges_into_the_presets_resolved_values():
    """Issue #10 item 5: one field of a nested model keeps the preset's other fields."""
    cfg = load_config("paper", overrides=["data.sources.mvtec.urls=[http://127.0.0.1:9/a.tar]"])
    mvtec = cfg.data.sources["mvtec"]
    assert mvtec.urls == ["http://127.0.0.1:9/a.tar"]
    assert mvtec.filename == "mvtec_anomaly_detection.tar.xz" and len(mvtec.sha256) == 64
    cfg = load_config("paper", overrides=["features.weights.pretrained=false"])
    assert cfg.features.weights.pretrained is False
    assert cfg.features.weights.timm_name == load_config("paper").features.weights.timm_name
    # the same through a YAML file
    smoke = load_config("smoke", extra={"padim": {"weights": {"offline": True}}})
    assert smoke.padim.weights.timm_name == "tf_efficientnet_lite0" and smoke.padim.weights.offline


@pytest.mark.parametrize("preset", ["smoke", "cpu-demo", "cpu"])
def test_cpu_presets_set_a_thread_count(preset):
    """Issue #10 item 9: torch's default thread count thrashes a shared CPU."""
    threads = load_config(preset).runtime.num_threads
    assert threads is not None and 1 <= threads * load_config(preset).runtime.local_workers <= 2


def test_train_crop_must_fit_the_image_and_the_network():
    cfg = load_config("smoke", overrides=["data.image_size=64", "data.train_crop=32"])
    assert cfg.network_size == 32 and load_config("smoke").network_size == 32
    with pytest.raises(ConfigError, match="data.train_crop=96"):
        load_config("smoke", overrides=["data.image_size=64", "data.train_crop=96"])
    with pytest.raises(ConfigError, match="data.train_crop=30"):
        load_config("smoke", overrides=["data.image_size=64", "data.train_crop=30"])


def test_feature_image_size_is_at_least_the_image_and_excludes_crops():
    cfg = load_config("smoke", overrides=["data.image_size=32", "features.image_size=64"])
    assert cfg.feature_image_size == 64 and cfg.model_hash() != load_config("smoke").model_hash()
    assert load_config("smoke", overrides=["features.image_size=32"]).feature_image_size is None
    with pytest.raises(ConfigError, match="features.image_size=16"):
        load_config("smoke", overrides=["features.image_size=16"])
    with pytest.raises(ConfigError, match="data.train_crop"):
        load_config("smoke", overrides=["features.image_size=64", "data.train_crop=16"])
    # "Ours*" paints its defects at the target's size (validation.choose_alpha).
    assert load_config("smoke", overrides=["features.image_size=64", "score.alpha_per_category=true"])


def test_feature_whitening_needs_the_calibration_and_is_an_evaluation_setting():
    cfg = load_config("cpu")
    assert cfg.score.feature_whitening == "full" and cfg.score.calibrate_maps
    with pytest.raises(ConfigError, match="score.feature_whitening=diagonal needs score.calibrate_maps=true"):
        load_config("smoke", overrides=["score.feature_whitening=diagonal"])
    # Scoring only: a trained model is reused under any whitening.
    plain = load_config("cpu", overrides=["score.feature_whitening=none"])
    assert plain.model_hash() == cfg.model_hash()


def test_edge_spreads_need_the_calibration_and_are_an_evaluation_setting():
    cfg = load_config("cpu")
    assert cfg.score.edge_spread_width == 4 and load_config("paper").score.edge_spread_width is None
    with pytest.raises(ConfigError, match="score.edge_spread_width=4 needs score.calibrate_maps=true"):
        load_config("smoke", overrides=["score.edge_spread_width=4"])
    with pytest.raises(ConfigError, match="edge_spread_width must be >= 1 or null"):
        load_config("cpu", overrides=["score.edge_spread_width=0"])
    assert load_config("cpu", overrides=["score.edge_spread_width=8"]).model_hash() == cfg.model_hash()


def test_two_sided_terms_need_the_calibration_and_are_an_evaluation_setting():
    cfg = load_config("cpu")
    assert load_config("paper").score.two_sided_terms == []
    with pytest.raises(ConfigError, match=r"score.two_sided_terms=\['feature'\] needs score.calibrate_maps=true"):
        load_config("smoke", overrides=["score.two_sided_terms=[feature]"])
    with pytest.raises(ConfigError, match="names a term twice"):
        load_config("cpu", overrides=["score.two_sided_terms=[kl,kl]"])
    with pytest.raises(ConfigError, match="two_sided_terms"):
        load_config("cpu", overrides=["score.two_sided_terms=[rgb]"])
    both = load_config("cpu", overrides=["score.two_sided_terms=[kl,feature]"])
    assert both.score.two_sided_terms == ["kl", "feature"] and both.model_hash() == cfg.model_hash()


def test_scored_step_fraction_defines_the_model_only_when_set():
    cfg = load_config("cpu")
    assert cfg.train.scored_step_fraction == 0.0
    assert "scored_step_fraction" not in cfg.model_definition()["train"]  # earlier models keep their hash
    half = load_config("cpu", overrides=["train.scored_step_fraction=0.5"])
    assert half.model_hash() != cfg.model_hash()
    with pytest.raises(ConfigError, match="scored_step_fraction"):
        load_config("cpu", overrides=["train.scored_step_fraction=1.5"])


def test_training_timestep_cap_covers_every_step_the_model_is_used_at():
    cfg = load_config("cpu")
    assert cfg.train.max_timestep == 401 and load_config("paper").train.max_timestep is None
    whole = load_config("cpu", overrides=["train.max_timestep=null"])  # Eq. 11's t = 100 is step 401
    assert whole.model_hash() != cfg.model_hash()
    with pytest.raises(ConfigError, match=r"diffusion.score_timesteps 100 is step 401 of the original chain, "
                                          r"above train.max_timestep=400"):
        load_config("cpu", overrides=["train.max_timestep=400"])
    with pytest.raises(ConfigError, match=r"reconstruct.denoise_t 8 is step 32 of the original chain"):
        load_config("cpu", overrides=["train.max_timestep=30", "diffusion.score_timesteps=[5]"])
    with pytest.raises(ConfigError, match="train.max_timestep=1000 is outside the 1000-step chain"):
        load_config("cpu", overrides=["train.max_timestep=1000"])


def test_position_means_need_the_calibration_and_are_an_evaluation_setting():
    cfg = load_config("cpu")
    assert cfg.score.position_mean_sigma == 2.0 and load_config("paper").score.position_mean_sigma is None
    with pytest.raises(ConfigError, match="score.position_mean_sigma=2.0 needs score.calibrate_maps=true"):
        load_config("smoke", overrides=["score.position_mean_sigma=2"])
    with pytest.raises(ConfigError, match="position_mean_sigma must be >= 0 or null"):
        load_config("cpu", overrides=["score.position_mean_sigma=-1"])
    assert load_config("cpu", overrides=["score.position_mean_sigma=null"]).model_hash() == cfg.model_hash()


def test_cpu_image_score_is_round_nineteens_top_64_and_an_evaluation_setting():
    # bench/tune_cpu_photo.txt: top-64 mean chosen on the photo tuning family.
    cfg = load_config("cpu")
    assert cfg.score.top_k == 64 and cfg.score.image_score_sigma == 0
    assert load_config("cpu-demo").score.top_k is None  # the demo keeps the paper's default
    assert load_config("cpu", overrides=["score.top_k=null"]).model_hash() == cfg.model_hash()
