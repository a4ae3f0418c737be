"""Where and how the networks run: device choice, mixed precision, threads and RNG state.

Everything here is about the machine, nothing about the method: training, scoring and
reconstruction all place their tensors with :func:`select_device` and wrap forward passes in
:func:`autocast_context`, so the CUDA / bf16 / fp16 rules live in one place.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


class DeviceError(RuntimeError):
    """The asked-for device or precision is not available on this machine."""


def select_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> the first visible CUDA device if any (CUDA_VISIBLE_DEVICES is respected by
    torch itself), else CPU; ``cpu``, ``cuda``, ``cuda:<i>`` as asked, with a clear error when
    the CUDA device is not there."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"runtime.device={spec!r} asks for CUDA, but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                "use runtime.device=auto or cpu"
            )
        if spec.startswith("cuda:"):
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise DeviceError(f"runtime.device={spec!r}: expected cuda:<index>") from None
            count = torch.cuda.device_count()
            if not 0 <= index < count:
                raise DeviceError(f"runtime.device={spec!r}: only {count} CUDA device(s) visible")
            return torch.device("cuda", index)
        return torch.device("cuda")
    raise DeviceError(f"runtime.device={spec!r} is not one of auto, cpu, cuda, cuda:<i>")


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting on ``device`` (None: full fp32).

    auto: bf16 on CUDA when supported, else fp16; fp32 elsewhere. bf16/fp16 force that dtype
    (bf16 also works on CPU; fp16 needs CUDA). off: fp32.
    """
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        supported = torch.cuda.is_bf16_supported()
        if amp == "bf16":
            if not supported:
                raise DeviceError(f"amp=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support")
            return torch.bfloat16
        if amp == "auto":
            return torch.bfloat16 if supported else torch.float16
    elif device.type == "cpu":
        if amp == "bf16":
            return torch.bfloat16
        if amp == "fp16":
            raise DeviceError("amp=fp16 needs a CUDA device; use auto, bf16 or off on CPU")
        if amp == "auto":
            return None
    elif amp == "auto":
        return None
    else:
        raise DeviceError(f"amp={amp!r} is not supported on device {device}")
    raise DeviceError(f"amp={amp!r} is not one of auto, bf16, fp16, off")


def autocast_context(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``amp_dtype(device, amp)``, or a no-op context for fp32."""
    device = torch.device(device)
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Pixels per UNet call on a CPU: one 64 px image at its three scoring timesteps. Larger calls
# fall out of the CPU caches: a channels-last UNet call on 24 images of 64 px (32 channels) cost
# 1.3x more per image than calls of 3, one on 6 images of 128 px (64 channels) 1.4x more than
# calls of 1 (issue #11). The backbones (PaDiM, the feature target) are not cache-bound like
# that: they run on the whole batch.
_CPU_PIXELS_PER_CALL = 3 * 64 * 64


def micro_batch(device: torch.device | str, height: int, width: int) -> int | None:
    """Images per UNet call: None (the whole batch) on an accelerator; on a CPU as many as make
    up ``_CPU_PIXELS_PER_CALL`` pixels, at least one."""
    if torch.device(device).type != "cpu":
        return None
    return max(1, _CPU_PIXELS_PER_CALL // (int(height) * int(width)))


def in_chunks(fn: Callable[..., Any], inputs: Sequence[torch.Tensor | None], chunk: int | None) -> Any:
    """``fn(*inputs)`` evaluated ``chunk`` rows at a time (None: in one call) and concatenated
    along dim 0; ``fn`` returns a tensor or a tuple of tensors, None inputs are passed as None.
    For networks whose rows are independent (no batch statistics)."""
    n = next(x.shape[0] for x in inputs if x is not None)
    if chunk is None or chunk >= n:
        return fn(*inputs)
    parts = [fn(*(None if x is None else x[i:i + chunk] for x in inputs)) for i in range(0, n, chunk)]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return tuple(torch.cat(column) for column in zip(*parts))


def use_channels_last(device: torch.device | str, setting: str) -> bool:
    """``runtime.channels_last``: on, off, or auto (on for CPU; CUDA stays NCHW until measured)."""
    if setting not in ("auto", "on", "off"):
        raise DeviceError(f"runtime.channels_last={setting!r} is not one of auto, on, off")
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cpu")


def prepare_for_inference(model: Any, channels_last: str = "auto", compile_unet: bool = False) -> Any:
    """Put a loaded model's UNet in its fastest form for scoring and reconstruction, in place
    (``runtime.channels_last``, ``runtime.compile_unet``): channels-last weights (a conv with
    channels-last weights gives channels-last activations, so the whole network follows; the
    backbones' depthwise convs gain nothing from it on a CPU), and ``torch.compile``. Outputs
    equal the eager NCHW ones to float tolerance (tests/test_runtime_throughput.py). Returns
    the model."""
    if use_channels_last(model.device, channels_last):
        model.unet.to(memory_format=torch.channels_last)
    if compile_unet and not hasattr(model.unet, "_orig_mod"):
        model.unet = torch.compile(model.unet)
    return model


def set_threads(num_threads: int | None) -> None:
    """``torch.set_num_threads`` when a count is configured (``runtime.num_threads``)."""
    if num_threads:
        torch.set_num_threads(int(num_threads))


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG states (python, numpy, torch, and CUDA's on a CUDA device)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
