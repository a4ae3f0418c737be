"""Throughput switches of runtime.py (issue #11): networks a few images at a time on a CPU,
channels-last weights and torch.compile, each giving the plain computation's numbers."""

from __future__ import annotations

import copy
import types

import pytest
import torch

import diffad_core.runtime as runtime
from diffad_core.config import load_config
from diffad_core.nets import UNet
from diffad_core.runtime import in_chunks, micro_batch, prepare_for_inference, use_channels_last

pytestmark = pytest.mark.usefixtures("one_thread")


def test_micro_batch_is_cache_sized_on_cpu_and_whole_elsewhere() -> None:
    assert micro_batch("cpu", 64, 64) == 3  # one 64 px image at its three scoring steps
    assert micro_batch("cpu", 32, 32) == 12
    assert micro_batch("cpu", 128, 128) == 1
    assert micro_batch("cpu", 256, 256) == 1  # never below one image
    assert micro_batch(torch.device("cuda"), 64, 64) is None


def test_in_chunks_concatenates_tensors_and_tuples() -> None:
    calls: list[int] = []

    def fn(a: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(a.shape[0])
        assert b is None
        return a * 2, a.sum(dim=1)

    a = torch.arange(14.0).view(7, 2)
    doubled, sums = in_chunks(fn, [a, None], 3)
    assert calls == [3, 3, 1]
    assert torch.equal(doubled, a * 2) and torch.equal(sums, a.sum(dim=1))
    assert torch.equal(in_chunks(lambda x: x + 1, [a], None), a + 1)
    assert torch.equal(in_chunks(lambda x: x + 1, [a], 100), a + 1)


def test_channels_last_setting() -> None:
    assert use_channels_last("cpu", "auto") and use_channels_last("cpu", "on")
    assert not use_channels_last("cpu", "off") and not use_channels_last(torch.device("cuda"), "auto")
    with pytest.raises(runtime.DeviceError, match="runtime.channels_last"):
        use_channels_last("cpu", "yes")


def _unet() -> UNet:
    cfg = load_config("smoke")
    torch.manual_seed(0)
    unet = UNet(cfg.unet, 32, feature_channels=8).eval()
    with torch.no_grad():
        for p in unet.out.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return unet


def test_channels_last_unet_gives_the_nchw_outputs() -> None:
    unet = _unet()
    model = types.SimpleNamespace(unet=copy.deepcopy(unet), feature_target=None, padim=None,
                                  device=torch.device("cpu"))
    prepare_for_inference(model, channels_last="on")
    assert model.unet.out[2].weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([20, 201, 401])
    with torch.no_grad():
        expected, got = unet(x, t, feature_size=4), model.unet(x, t, feature_size=4)
    for e, g in zip(expected, got):
        assert g.is_contiguous() and torch.allclose(g, e, atol=1e-5)


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_outputs() -> None:
    """runtime.compile_unet=true (off by default; meant for a GPU) on the smoke UNet."""
    unet = _unet()
    model = types.SimpleNamespace(unet=copy.deepcopy(unet), feature_target=None, padim=None,
                                  device=torch.device("cpu"))
    prepare_for_inference(model, channels_last="off", compile_unet=True)
    assert hasattr(model.unet, "_orig_mod")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([20, 401])
    with torch.no_grad():
        expected, got = unet(x, t), model.unet(x, t)
    for e, g in zip(expected, got):
        assert torch.allclose(g, e, atol=1e-4)
