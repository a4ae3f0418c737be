"""Training, scoring and reconstruction throughput of a preset, with model FLOPs utilisation.

Meant for a GPU with the ``paper`` preset (METHOD.md §2: 256 px ADM, batch 2), offline:

    .venv/bin/python bench/bench_train_score.py --preset paper --steps 30 --set train.init_checkpoint=null

It trains ``--steps`` iterations on the synthetic dataset (generated at the preset's image size,
one category) through the same use case as ``diffad train`` (``train.init_checkpoint=null``
trains from scratch: the same throughput as fine-tuning the ImageNet ADM, without its 2 GB
download), then, through ``usecases.load_for_evaluation`` (so with ``runtime.channels_last`` /
``runtime.compile_unet`` as set), scores that category's test split and reconstructs
``--recon-images`` of its images (Algorithm 1 with the preset's rounds unless
``--set reconstruct.rounds=N``). Random backbone weights are used unless ``--pretrained`` is
given (throughput does not depend on them).

It prints a table and appends one JSON line to ``--results`` (bench/bench_train_score.jsonl):
training steps/s, scoring and reconstruction images/s, peak memory (CUDA: allocated by torch;
CPU: the process's peak RSS), and model FLOPs utilisation: the FLOPs of one training step, one
scored image and one reconstructed image, counted by ``torch.utils.flop_counter.FlopCounterMode``
(matmuls and convolutions; 2 FLOPs per multiply-add), times the measured rates, divided by the
device's dense peak for the precision used (``PEAK_TFLOPS``; fp32 convs and matmuls count at
the TF32 peak when torch allows TF32). On a CPU it reports FLOP/s and MFU null.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# Dense peak TFLOP/s per precision from the vendors' data sheets (SXM parts unless named).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "tf32": 494.0, "bf16": 989.0, "fp16": 989.0},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.0, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's peak for the first (longest) name contained in ``device_name``; None if
    unknown (and always on a CPU)."""
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name.lower() in device_name.lower():
            return PEAK_TFLOPS[name].get(precision)
    return None


def _precision(torch, device, amp: str) -> str:
    from diffad_core.runtime import amp_dtype

    dtype = amp_dtype(device, amp)
    if dtype is not None:
        return str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "fp32"


def _count_flops(torch, fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--category", default="washer")
    parser.add_argument("--recon-images", type=int, default=4)
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--results", default=str(Path(__file__).with_name("bench_train_score.jsonl")),
                        help="append the JSON line here")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="diffad-bench-"))
    os.environ["DIFFAD_HOME"] = str(home)
    import torch

    from diffad_core.config import load_config
    from diffad_core.data import prepare_split, resolve_dataset
    from diffad_core.diffusion import training_losses
    from diffad_core.model import diffusion_schedule
    from diffad_core.provenance import device_info, library_versions
    from diffad_core.reconstruct import gradient_denoise, reconstruct_split
    from diffad_core.score import score_batch, score_split
    from diffad_core.usecases import load_for_evaluation, train_category

    probe = load_config(args.preset, overrides=list(args.overrides))
    size = probe.data.image_size
    overrides = [
        "data.dataset=synthetic", f"data.categories=[{args.category}]",
        f"data.synth.size={size}", "data.synth.n_train=16", "data.synth.n_test_good=8",
        "data.synth.n_test_per_defect=4", f"train.iterations={args.steps}",
        f"train.checkpoint_every={args.steps}",
        *([] if args.pretrained else ["features.weights.pretrained=false",
                                      "padim.weights.pretrained=false"]),
        *args.overrides,
    ]
    cfg = load_config(args.preset, overrides=overrides)
    resolve_dataset(cfg, progress=False)
    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak_gib() -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_category(cfg, [args.category], home / "ck", resume=False, progress=True)
    train_s = time.perf_counter() - start
    train_peak = peak_gib()

    ev = load_for_evaluation(home / "ck")
    model = ev.model
    prepared = prepare_split(ev.cfg, args.category, "test")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    n_scored = sum(1 for _ in score_split(model, prepared, ev.cfg.score, alpha=ev.cfg.score.alpha,
                                          progress=False))
    sync()
    score_s = time.perf_counter() - start
    score_peak = peak_gib()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    n_recon = sum(1 for _ in reconstruct_split(model, prepared, ev.cfg.reconstruct,
                                               limit=args.recon_images, seed=0, progress=False))
    sync()
    recon_s = time.perf_counter() - start
    recon_peak = peak_gib()

    # FLOPs: one scored batch, one round of Algorithm 1 on one image, one training step.
    images = torch.from_numpy(prepared.images[: ev.cfg.score.batch_size].copy())
    score_flops = _count_flops(torch, lambda: score_batch(model, images, args.category, ev.cfg.score,
                                                          alpha=0.5)) / images.shape[0]
    one_round = ev.cfg.reconstruct.model_copy(update={"rounds": 1})
    recon_flops = _count_flops(torch, lambda: gradient_denoise(model, images[:1], one_round,
                                                               category=args.category))
    recon_flops *= int(ev.cfg.reconstruct.rounds)
    unet = copy.deepcopy(getattr(model.unet, "_orig_mod", model.unet)).train()
    unet.requires_grad_(True)
    train_schedule, _ = diffusion_schedule(cfg)
    x0 = torch.from_numpy(prepared.images[: cfg.train.batch_size].copy()).to(model.device)
    y = model.class_labels(args.category, x0.shape[0])

    def train_step() -> None:
        from diffad_core.runtime import autocast_context

        t = torch.randint(0, train_schedule.num_timesteps, (x0.shape[0],)).to(model.device)
        with torch.no_grad(), autocast_context(model.device, cfg.train.amp):
            target = model.feature_target(x0)

        def unet_fn(x, tt, yy):
            with autocast_context(model.device, cfg.train.amp):
                return unet(x, tt, yy)

        training_losses(train_schedule, unet_fn, x0, t, y, target,
                        feature_weight=cfg.train.feature_loss_weight)["loss"].mean().backward()

    train_flops = _count_flops(torch, train_step)

    info = device_info()
    name = info.get("cuda_name", "cpu") if cuda else "cpu"
    # Training: the trainer's own loop time (result.seconds), not data synthesis or the PaDiM fit.
    rates = {"train": result.steps / result.seconds, "score": n_scored / score_s,
             "reconstruct": n_recon / recon_s}
    flops = {"train": train_flops, "score": score_flops, "reconstruct": recon_flops}
    precision = {"train": _precision(torch, model.device, cfg.train.amp),
                 "score": _precision(torch, model.device, ev.cfg.score.amp),
                 "reconstruct": _precision(torch, model.device, cfg.train.amp)}
    achieved = {k: rates[k] * flops[k] for k in rates}
    mfu = {}
    for k in rates:
        peak = peak_tflops(name, precision[k]) if cuda else None
        mfu[k] = achieved[k] / (peak * 1e12) if peak else None
    versions = library_versions()
    record = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset, "image_size": size, "overrides": list(args.overrides),
        "device": name, "torch": versions.get("torch"),
        "runtime": {"channels_last": ev.cfg.runtime.channels_last, "compile_unet": ev.cfg.runtime.compile_unet},
        "train_steps": result.steps, "train_batch": cfg.train.batch_size,
        "train_seconds_with_padim_fit": train_s,
        "train_steps_per_s": rates["train"],
        "score_images": n_scored, "score_batch": ev.cfg.score.batch_size,
        "score_images_per_s": rates["score"],
        "reconstruct_images": n_recon, "reconstruct_rounds": int(ev.cfg.reconstruct.rounds),
        "reconstruct_images_per_s": rates["reconstruct"],
        "peak_memory_gib": {"train": train_peak, "score": score_peak, "reconstruct": recon_peak},
        "peak_memory_kind": "cuda_max_allocated" if cuda else "process_max_rss",
        "flops_per_unit": {"train_step": flops["train"], "scored_image": flops["score"],
                           "reconstructed_image": flops["reconstruct"]},
        "precision": precision,
        "achieved_tflops": {k: v / 1e12 for k, v in achieved.items()},
        "mfu": mfu,
    }
    lines = [
        f"preset {args.preset} ({size} px), device {name}, torch {versions.get('torch')}, "
        f"overrides: {' '.join(args.overrides) or '-'}",
        f"init: {result.init_report[0] if result.init_report else 'from scratch'}",
    ]
    labels = {"train": f"train ({cfg.train.batch_size} img/step)", "score": "score", "reconstruct":
              f"reconstruct ({ev.cfg.reconstruct.rounds} rounds)"}
    units = {"train": "steps/s", "score": "images/s", "reconstruct": "images/s"}
    peaks = {"train": train_peak, "score": score_peak, "reconstruct": recon_peak}
    for k in rates:
        util = f"MFU {100 * mfu[k]:.1f}% ({precision[k]})" if mfu[k] is not None else "MFU n/a"
        lines.append(f"{labels[k]}: {rates[k]:.3g} {units[k]}, {flops[k] / 1e12:.3g} TFLOP each, "
                     f"{achieved[k] / 1e12:.3g} TFLOP/s, {util}; peak memory {peaks[k]:.2f} GiB")
    text = "\n".join(lines)
    print(text)
    with open(args.results, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
    if args.out:
        Path(args.out).write_text(text + "\n")
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
