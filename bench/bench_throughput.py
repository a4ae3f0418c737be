"""Scoring, reconstruction and training throughput on CPU against plain reference loops (issue #11).

    .venv/bin/python bench/bench_throughput.py --out bench/bench_throughput.txt

Two networks, both with the cpu-demo preset's settings and random UNet weights (throughput does
not depend on them): the cpu-demo UNet (64 px, 32 base channels) and a larger one (128 px, 64
base channels). Per network and batch size (1, 8, 32), side by side and interleaved (the machine
is shared and noisy; only ratios measured in one run mean anything), medians over ``--reps``:

- scoring, images/s of three computations of Eq. 11 (``ablations`` off):
  ``reference``: a plain loop over the three scoring steps running the UNet twice per t (KL pass
  with the mapped step, feature pass with the unmapped index, as the official code does) and
  the feature target per t, each call on the whole batch, NCHW, full backbones;
  ``ours, 2 passes``: ``score.score_batch`` with those same two passes per t
  (``official_timestep_quirk``); ``ours``: ``score.score_batch`` with the preset's own settings
  (one pass per t). Both "ours" run on the model as ``usecases.load_for_evaluation`` prepares it
  (``runtime.prepare_for_inference``);
- reconstruction (Algorithm 1, ``--rounds`` rounds of 5 PaDiM gradient steps), images/s:
  ``before``: Algorithm 1 as it was before issue #11 (autograd through the PaDiM map, every
  backbone stage, channels resized then selected, each call on the whole batch, NCHW);
  ``ours``: ``reconstruct.gradient_denoise``. Their PaDiM gradients g (std 1 per image) are
  compared on the batch (max abs difference). Their final images are not: Algorithm 1 amplifies
  float rounding (lite0's ReLU6 kinks flip), so even the ``before`` code moves its output by
  the amount printed per network when its input moves by 1e-7;
- training steps/s at the preset's batch (4): the hybrid loss, backward, AdamW step.

Inputs are smooth random images (8x8 noise resized bilinearly, plus a little pixel noise). The
UNet code (its CPU fast paths for nearest upsampling and attention) is the same in all columns.

Torch runs on one thread (``--threads``), as the cpu-demo preset does.

What torch.profiler showed on this 2-core machine (64 px network, one thread), and the fixes:

- the non-UNet maths of Eq. 11 (q_sample, KL in bits, per-image normalisation, feature error,
  interpolation) is about 1 ms per image; RGB and PaDiM maps are computed only when asked for;
- the feature target and PaDiM ran every stage of their EfficientNet although the outputs end
  at stage 2 or 4 (1x1 convs on 2x2 maps in the slow conv path): the unused stages are dropped
  (``nets.backbones``): PaDiM's gradient 7.5 -> 5.3 ms per image at batch 8 (4.9 with the
  closed form below);
- ``F.interpolate(mode="nearest")`` copies its input three times on CPU (34 ms vs 6 ms for
  24 x 64 x 32 x 32); SDPA on strided q/k/v takes its math fallback (27 ms vs 9 ms at 16x16):
  both replaced in ``nets.unet`` by exact equivalents;
- larger batches were slower per image because of memory, not threads (one thread): a UNet call
  on 24 images of 64 px cost 1.3x more per image than calls of 3, on 6 of 128 px 1.4x more than
  calls of 1 (channels-last; NCHW 1.5-1.7x at 128 px); on a CPU the
  UNet and the maps now run a few images at a time (``runtime.micro_batch``), with
  channels-last weights (``runtime.prepare_for_inference``), and 1x1 convs as matmuls (the CPU
  conv dispatch copied channels-last input for them: a fifth of the UNet's time);
- Algorithm 1: PaDiM's Mahalanobis gradient in closed form (no autograd through the distance),
  channels selected before resizing. What is left per round at batch 1 is the UNet reverse step
  (25 ms, about 100 GFLOP/s: near this core's peak) and five PaDiM gradients (10 ms each, many
  small ops), so Algorithm 1 stays below 2x the code before at small batches.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from diffad_core.config import load_config
from diffad_core.diffusion import kl_map_bits, model_timesteps, p_mean_variance, q_sample, training_losses
from diffad_core.model import DiffadModel, build_feature_target, build_padim, diffusion_schedule
from diffad_core.nets import build_unet, create_timm_model
from diffad_core.nets.features import resize_concat
from diffad_core.provenance import device_info, library_versions
from diffad_core.reconstruct import _padim_gradient, gradient_denoise
from diffad_core.runtime import prepare_for_inference
from diffad_core.score import _normalise_per_image, image_scores, score_batch

NETWORKS = {"64px/32ch (cpu-demo)": (64, 32), "128px/64ch": (128, 64)}
BATCHES = (1, 8, 32)


def _images(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1, size=(size, size), mode="bilinear",
                      align_corners=False)
    return (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def _models(size: int, channels: int) -> tuple[DiffadModel, DiffadModel]:
    """(plain, prepared): the same weights; ``plain`` keeps NCHW and the full timm backbones
    (every stage, as before issue #11), ``prepared`` is what load_for_evaluation gives."""
    cfg = load_config("cpu-demo", overrides=[f"data.image_size={size}", f"unet.base_channels={channels}",
                                             "score.ablations=[]"])
    target = build_feature_target(cfg)
    torch.manual_seed(0)
    unet = build_unet(cfg, target.channels).eval()
    with torch.no_grad():  # the ADM output conv starts at zero: give the reverse step some work
        for p in unet.out.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    padim = build_padim(cfg)
    gen = torch.Generator().manual_seed(0)
    padim.fit([_images(16, size, gen) for _ in range(2)])
    _, schedule = diffusion_schedule(cfg)
    prepared = DiffadModel(cfg=cfg, unet=unet, feature_target=target, padim=padim, schedule=schedule,
                           class_index={"bench": 0}, device=torch.device("cpu"), meta={"categories": ["bench"]})
    plain = copy.copy(prepared)
    plain.unet = copy.deepcopy(unet)
    plain.feature_target = copy.deepcopy(target)
    plain.feature_target.backbone = create_timm_model(cfg.features.weights, cfg.features.out_indices).eval()
    plain.padim = copy.deepcopy(padim)
    plain.padim.backbone = create_timm_model(cfg.padim.weights, cfg.padim.out_indices).eval()
    for net in (plain.feature_target.backbone, plain.padim.backbone):
        net.requires_grad_(False)
    prepare_for_inference(prepared, prepared.cfg.runtime.channels_last)
    return plain, prepared


# ----------------------------------------------------------------------------- reference loops
@torch.no_grad()
def _reference_scores(m: DiffadModel, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 11 the plain way: per scoring step, the KL pass and the feature pass on the whole
    batch, the target recomputed per step; image scores (B,)."""
    s, settings = m.schedule, m.cfg.score
    b, _, h, w = x0.shape
    steps = [int(t) for t in m.cfg.diffusion.score_timesteps]
    kl_sum, feat_sum = torch.zeros(b, h, w), torch.zeros(b, h, w)
    for j, step in enumerate(steps):
        t = torch.full((b,), step, dtype=torch.long)
        x_t = q_sample(s, x0, t, noise[j])
        out, _ = m.unet(x_t, model_timesteps(s, t), None, feature_size=settings.feature_map_size)
        _, feat = m.unet(x_t, t, None, feature_size=settings.feature_map_size)
        target = m.feature_target(x0, size=settings.feature_map_size)
        kl = _normalise_per_image(kl_map_bits(s, out, x0, x_t, t), settings.kl_unbiased_std)
        kl_sum += kl.mean(dim=1)
        err = (feat - target).pow(2).mean(dim=1, keepdim=True)
        feat_sum += F.interpolate(err, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    anomaly = 0.5 * kl_sum / len(steps) + 0.5 * feat_sum / len(steps)
    return image_scores(anomaly, settings)


def _before_padim_gradient(m: DiffadModel, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 line 4 as before issue #11: autograd through the whole PaDiM map."""
    pd = m.padim
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        inp = ((xg + 1) / 2 - pd.norm_mean) / pd.norm_std
        emb = resize_concat(list(pd.backbone(inp)), pd.grid).index_select(1, pd.channel_index).flatten(2)
        diff = emb.permute(2, 0, 1) - pd.mean[:, None, :]
        dist = ((diff @ pd.inv_cov) * diff).sum(-1).clamp_min(1e-12).sqrt()
        (grad,) = torch.autograd.grad(dist.mean(dim=0).sum(), xg)
    g = -grad
    return g / g.flatten(1).std(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def _before_reconstruct(m: DiffadModel, images: torch.Tensor, rounds: int) -> torch.Tensor:
    cfg = m.cfg.reconstruct
    s = cfg.step_size
    t = torch.full((images.shape[0],), cfg.denoise_t, dtype=torch.long)
    x = images.clone()
    for _ in range(rounds):
        for _ in range(cfg.grad_steps):
            x = math.sqrt(1 - s * s) * x + s * _before_padim_gradient(m, x)
        with torch.no_grad():
            out, _ = m.unet(x, model_timesteps(m.schedule, t), None)
            x = p_mean_variance(m.schedule, out, x, t, clip=True)["mean"]
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- timing
def _interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, the functions run in turn ``reps`` times."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _train_steps_per_s(m: DiffadModel, steps: int) -> float:
    cfg = m.cfg
    unet = copy.deepcopy(m.unet).train().to(memory_format=torch.contiguous_format)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr)
    train_schedule, _ = diffusion_schedule(cfg)
    gen = torch.Generator().manual_seed(0)
    size = cfg.data.image_size

    def step() -> None:
        x0 = torch.rand(cfg.train.batch_size, 3, size, size, generator=gen) * 2 - 1
        t = torch.randint(0, train_schedule.num_timesteps, (x0.shape[0],), generator=gen)
        with torch.no_grad():
            target = m.feature_target(x0)
        terms = training_losses(train_schedule, lambda x, tt, y: unet(x, tt, y), x0, t, None, target,
                                noise=torch.randn(x0.shape, generator=gen),
                                feature_weight=cfg.train.feature_loss_weight)
        opt.zero_grad(set_to_none=True)
        terms["loss"].mean().backward()
        opt.step()

    step()  # warm-up
    return 1.0 / _interleaved({"train": step}, steps)["train"]


def _bench_network(label: str, size: int, channels: int, reps: int, rounds: int,
                   train_steps: int) -> list[str]:
    plain, ours = _models(size, channels)
    two_pass = ours.cfg.score.model_copy(update={"official_timestep_quirk": True})
    n_t = len(ours.cfg.diffusion.score_timesteps)
    lines = [f"## {label}", "",
             "| batch | scoring img/s: reference / ours, 2 passes / ours | ours vs reference | "
             "reconstruction img/s: before / ours | ours vs before | g: max abs diff |",
             "|---|---|---|---|---|---|"]
    for batch in BATCHES:
        gen = torch.Generator().manual_seed(batch)
        x = _images(batch, size, gen)
        noise = torch.randn(n_t, *x.shape, generator=gen)

        def ours_score(settings=ours.cfg.score) -> None:
            score_batch(ours, x, "bench", settings, alpha=0.5, generator=torch.Generator().manual_seed(0))

        fns = {"reference": lambda: _reference_scores(plain, x, noise),
               "two_pass": lambda: ours_score(two_pass), "ours": ours_score}
        if batch == BATCHES[0]:  # warm-up (weights in memory, oneDNN primitives), on one image
            for fn in fns.values():
                fn()
        sc = _interleaved(fns, reps)
        rec_fns = {"before": lambda: _before_reconstruct(plain, x, rounds),
                   "ours": lambda: gradient_denoise(ours, x, ours.cfg.reconstruct.model_copy(update={"rounds": rounds}))}
        recon = _interleaved(rec_fns, reps)
        diff = float((_before_padim_gradient(plain, x) - _padim_gradient(ours, x)).abs().max())
        ips = {k: batch / v for k, v in sc.items()}
        rps = {k: batch / v for k, v in recon.items()}
        lines.append(f"| {batch} | {ips['reference']:.2f} / {ips['two_pass']:.2f} / {ips['ours']:.2f} | "
                     f"{ips['ours'] / ips['reference']:.2f}x (2 passes: {ips['two_pass'] / ips['reference']:.2f}x) | "
                     f"{rps['before']:.2f} / {rps['ours']:.2f} | {rps['ours'] / rps['before']:.2f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    x = _images(2, size, torch.Generator().manual_seed(1))
    moved = _before_reconstruct(plain, x + 1e-7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)), 1)
    lines += ["", f"Algorithm 1, 1 round, before code: input moved by 1e-7 -> output moved by "
                  f"{float((_before_reconstruct(plain, x, 1) - moved).abs().max()):.2g} (max abs)"]
    print(lines[-1], flush=True)
    lines += ["", f"training: {_train_steps_per_s(ours, train_steps):.2f} steps/s "
                  f"(batch {ours.cfg.train.batch_size}, hybrid loss + backward + AdamW)", ""]
    print(lines[-2], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (64 px network)")
    parser.add_argument("--reps-large", type=int, default=1, help="repetitions for the 128 px network")
    parser.add_argument("--rounds", type=int, default=2, help="Algorithm 1 rounds per reconstruction")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=sorted(NETWORKS), default=None)
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    versions = library_versions()
    lines = ["# Throughput on CPU (issue #11): bench/bench_throughput.py", "",
             f"device {device_info()}, torch {versions.get('torch')}, {args.threads} thread(s); "
             f"medians of {args.reps} interleaved runs (64 px) / {args.reps_large} (128 px); "
             f"reconstruction {args.rounds} rounds x 5 gradient steps", ""]
    for label, (size, channels) in NETWORKS.items():
        if args.only and label != args.only:
            continue
        reps = args.reps if size <= 64 else args.reps_large
        lines += _bench_network(label, size, channels, reps, args.rounds, args.train_steps)
    lines.append(f"total {time.perf_counter() - start:.0f} s")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
