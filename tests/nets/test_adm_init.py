"""OpenAI ADM initialisation: all-or-nothing loading by name and shape (METHOD.md §2).

The OpenAI key layout is generated here from the structure rules of guided-diffusion's
UNetModel (independently of our UNet), and checked against known names, shapes and the
parameter count of the released 256x256 class-conditional model.
"""

import pytest
import torch

from diffad_core.config import load_config
from diffad_core.nets import AdmInitError, UNet, load_adm_init
from diffad_core.nets.adm_init import check_adm_state_dict

ADM_256_COND_PARAMS = 553_838_086  # OpenAI 256x256 class-conditional ADM (1000 classes, 6 ch out)


def openai_layout(mc=256, mult=(1, 1, 2, 2, 4, 4), n_res=2, attn_ds=(8, 16, 32), classes=1000,
                  in_ch=3, out_ch=6) -> dict[str, tuple[int, ...]]:
    """name -> shape of guided-diffusion's UNetModel (scale-shift norm, resblock up/down)."""
    shapes: dict[str, tuple[int, ...]] = {}
    emb = 4 * mc

    def param(name, weight, bias):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = weight, bias

    def res(p, c_in, c_out):
        param(f"{p}.in_layers.0", (c_in,), (c_in,))
        param(f"{p}.in_layers.2", (c_out, c_in, 3, 3), (c_out,))
        param(f"{p}.emb_layers.1", (2 * c_out, emb), (2 * c_out,))
        param(f"{p}.out_layers.0", (c_out,), (c_out,))
        param(f"{p}.out_layers.3", (c_out, c_out, 3, 3), (c_out,))
        if c_in != c_out:
            param(f"{p}.skip_connection", (c_out, c_in, 1, 1), (c_out,))

    def attn(p, c):
        param(f"{p}.norm", (c,), (c,))
        param(f"{p}.qkv", (3 * c, c, 1), (3 * c,))
        param(f"{p}.proj_out", (c, c, 1), (c,))

    param("time_embed.0", (emb, mc), (emb,))
    param("time_embed.2", (emb, emb), (emb,))
    if classes:
        shapes["label_emb.weight"] = (classes, emb)
    ch = mc * mult[0]
    param("input_blocks.0.0", (ch, in_ch, 3, 3), (ch,))
    skips, ds, n = [ch], 1, 1
    for level, m in enumerate(mult):
        for _ in range(n_res):
            res(f"input_blocks.{n}.0", ch, m * mc)
            ch = m * mc
            if ds in attn_ds:
                attn(f"input_blocks.{n}.1", ch)
            skips.append(ch)
            n += 1
        if level != len(mult) - 1:
            res(f"input_blocks.{n}.0", ch, ch)  # down=True: average pooling, no parameters
            skips.append(ch)
            n, ds = n + 1, ds * 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    n = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(n_res + 1):
            res(f"output_blocks.{n}.0", ch + skips.pop(), mc * m)
            ch, j = mc * m, 1
            if ds in attn_ds:
                attn(f"output_blocks.{n}.1", ch)
                j = 2
            if level and i == n_res:
                res(f"output_blocks.{n}.{j}", ch, ch)  # up=True
                ds //= 2
            n += 1
    param("out.0", (ch,), (ch,))
    param("out.2", (out_ch, ch, 3, 3), (out_ch,))
    return shapes


def _meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


@pytest.fixture(scope="module")
def paper_unet() -> UNet:
    with torch.device("meta"):
        return UNet(load_config("paper").unet, 256, feature_channels=272)


def test_openai_layout_is_the_released_model():
    layout = openai_layout()
    assert layout["input_blocks.0.0.weight"] == (256, 3, 3, 3)
    assert layout["out.2.weight"] == (6, 256, 3, 3)
    assert layout["label_emb.weight"] == (1000, 1024)
    assert layout["time_embed.0.weight"] == (1024, 256)
    assert layout["middle_block.1.qkv.weight"] == (3072, 1024, 1)
    assert layout["output_blocks.2.2.in_layers.2.weight"] == (1024, 1024, 3, 3)  # 8 px up block
    assert "input_blocks.3.0.skip_connection.weight" not in layout  # down block keeps 256 ch
    assert sum(torch.Size(s).numel() for s in layout.values()) == ADM_256_COND_PARAMS


def test_paper_unet_loads_the_openai_layout(paper_unet):
    layout = openai_layout()
    own = {k: tuple(v.shape) for k, v in paper_unet.state_dict().items()}
    assert set(own) - set(layout) == {"feature_head.0.weight", "feature_head.0.bias",
                                      "feature_head.2.weight", "feature_head.2.bias"}
    assert set(layout) <= set(own)  # same names: nothing to rename
    report = load_adm_init(paper_unet, _meta_state(layout), num_classes=15)
    assert report.tensors_loaded == len(layout) - 1 == len(own) - 5
    assert report.parameters_loaded == ADM_256_COND_PARAMS - 1000 * 1024
    assert report.fresh == ["feature_head.0.bias", "feature_head.0.weight",
                            "feature_head.2.bias", "feature_head.2.weight", "label_emb.weight"]
    assert report.parameters_fresh == 15 * 1024 + 2 * 512 + 512 * 272 + 272
    assert report.dropped == ["label_emb.weight"]
    rows = {(r["group"], r["status"]): r for r in report.rows}
    assert rows[("label_emb", "re-initialised")]["parameters"] == 15 * 1024
    assert rows[("label_emb", "dropped (file only)")]["parameters"] == 1000 * 1024
    assert rows[("feature_head", "re-initialised")]["tensors"] == 4
    assert rows[("output_blocks", "loaded")]["tensors"] > 0
    assert "| input_blocks | loaded |" in report.table_markdown()
    assert any("15 classes" in line and "1000" in line for line in report.lines)
    assert report.to_dict()["tensors_loaded"] == report.tensors_loaded


@pytest.mark.parametrize("change, pattern", [
    (lambda s: s.update({"out.2.weight": (3, 256, 3, 3)}),
     r"1 shape mismatch\(es\): out\.2\.weight file \(3, 256, 3, 3\) vs model \(6, 256, 3, 3\)"),
    (lambda s: s.pop("middle_block.1.qkv.weight"), r"1 missing key\(s\).*middle_block\.1\.qkv\.weight"),
    (lambda s: s.update({"extra.weight": (4,)}), r"1 unexpected key\(s\).*extra\.weight"),
    (lambda s: s.update({"feature_head.2.weight": (272, 512, 1, 1)}), r"unexpected.*feature_head"),
])
def test_any_other_mismatch_is_an_error(paper_unet, change, pattern):
    layout = openai_layout()
    change(layout)
    with pytest.raises(AdmInitError, match=pattern):
        load_adm_init(paper_unet, _meta_state(layout), num_classes=15)


def test_error_names_the_first_few_of_many():
    own = openai_layout()
    bad = {k: ((v[0] + 1,) + v[1:]) for k, v in own.items()}
    with pytest.raises(AdmInitError) as err:
        check_adm_state_dict(own, bad, "x.pt")
    msg = str(err.value)
    assert "x.pt" in msg and f"{len(own) - 1} shape mismatch" in msg
    assert msg.count(" vs model ") == 5


def _small(class_cond: bool, seed: int) -> UNet:
    cfg = load_config("smoke").unet.model_copy(update={"class_cond": class_cond, "num_classes": 3})
    torch.manual_seed(seed)
    return UNet(cfg, 32, feature_channels=5)


def _as_openai_file(src: UNet) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in src.state_dict().items()
             if not k.startswith(("feature_head.", "label_emb."))}
    state["label_emb.weight"] = torch.randn(1000, 4 * src.cfg.base_channels, generator=gen)
    return state


@pytest.mark.parametrize("class_cond", [True, False])
def test_small_unet_round_trip_through_a_file(tmp_path, class_cond):
    target = _small(class_cond, seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = _as_openai_file(target)
    path = tmp_path / "adm.pt"
    torch.save({"module." + k: v for k, v in state.items()}, path)
    report = load_adm_init(target, path, num_classes=3 if class_cond else None)
    after = target.state_dict()
    for key, value in after.items():
        if key.startswith(("feature_head.", "label_emb.")):
            assert torch.equal(value, before[key]), key  # fresh init kept
        else:
            assert torch.equal(value, state[key]), key
    assert report.source == str(path) and report.dropped == ["label_emb.weight"]
    assert report.tensors_loaded == len(state) - 1


def test_failed_load_leaves_the_unet_untouched():
    target = _small(True, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = _as_openai_file(target)
    state["out.2.weight"] = torch.zeros(3, 16, 3, 3)
    with pytest.raises(AdmInitError, match="out.2.weight"):
        load_adm_init(target, state, num_classes=3)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_num_classes_must_match_the_unet():
    with pytest.raises(ValueError, match="num_classes=4"):
        load_adm_init(_small(True, seed=0), {}, num_classes=4)
    with pytest.raises(ValueError, match="no classes"):
        load_adm_init(_small(False, seed=0), {}, num_classes=3)


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(AdmInitError, match="does not exist"):
        load_adm_init(_small(False, seed=0), tmp_path / "nope.pt", num_classes=None)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(AdmInitError, match="junk.pt"):
        load_adm_init(_small(False, seed=0), junk, num_classes=None)
