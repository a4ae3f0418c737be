"""The same model scores the same test images on the CPU and on CUDA: how far apart are the maps?

For a session lent a GPU (part of ``bash bench/gpu_check.sh``). One small model of ``--preset``
is trained (a few steps, random backbone weights, on whatever device ``auto`` picks: training
is not what is compared), then its test split is scored with identical settings and noise (the
forward noise is drawn on the CPU, ``score.score_split``) on the CPU in fp32, on CUDA in fp32
with TF32 off, on CUDA as configured (TF32 allowed) and under bf16 / fp16 autocast
(``score.amp``); without CUDA, on the CPU under bf16 autocast instead. Each row gives the largest difference from the CPU maps (Eq. 11's map, the KL
and the feature term), divided by the CPU map's range, and the pixel / image AUROC of each run.

    python3 bench/gpu_parity.py --preset paper --out bench/gpu_parity.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from diffad_core.config import load_config
from diffad_core.data import prepare_split, resolve_dataset
from diffad_core.metrics import image_auroc, pixel_auroc
from diffad_core.model import stored_config
from diffad_core.score import score_split
from diffad_core.usecases import load_for_evaluation, train_category

# (name, runtime.device, score.amp, TF32 allowed); the CUDA rows only where torch sees CUDA.
CPU_VARIANTS = (("cpu fp32", "cpu", "off", False), ("cpu bf16", "cpu", "bf16", False))
CUDA_VARIANTS = (("cuda fp32", "cuda", "off", False), ("cuda tf32", "cuda", "off", True),
                 ("cuda bf16", "cuda", "bf16", True), ("cuda fp16", "cuda", "fp16", True))
MAPS = ("anomaly_map", "kl_map", "feature_map")


def _score(checkpoint: Path, cfg, prepared, device: str, amp: str, tf32: bool) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    run = cfg.with_changes({"runtime": {"device": device}, "score": {"amp": amp}})
    ev = load_for_evaluation(checkpoint, run)
    recs = list(score_split(ev.model, prepared, ev.cfg.score, alpha=ev.cfg.score.alpha,
                            seed=ev.cfg.seed, progress=False))
    out = {name: np.stack([getattr(r, name) for r in recs]).astype(np.float64) for name in MAPS}
    out["image_score"] = np.array([r.image_score for r in recs])
    out["masks"] = np.stack([r.mask for r in recs])
    out["labels"] = np.array([r.label for r in recs])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--category", default="bolt")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="diffad-parity-"))
    os.environ["DIFFAD_HOME"] = str(home)
    probe = load_config(args.preset)
    cfg = load_config(args.preset, overrides=[
        "data.dataset=synthetic", f"data.categories=[{args.category}]",
        f"data.synth.size={probe.data.image_size}", "data.synth.n_train=8",
        "data.synth.n_test_good=1", "data.synth.n_test_per_defect=1",
        f"train.iterations={args.steps}", f"train.checkpoint_every={args.steps}",
        "train.init_checkpoint=null", "features.weights.pretrained=false",
        "padim.weights.pretrained=false", "reconstruct.enabled=false"])
    resolve_dataset(cfg, progress=False)
    train_category(cfg, [args.category], home / "ck", resume=False, progress=False)

    cuda = torch.cuda.is_available()
    # With CUDA the CPU's bf16 row is left out: at paper size it is minutes of CPU time.
    variants = (CPU_VARIANTS[0], *CUDA_VARIANTS) if cuda else CPU_VARIANTS
    # The same images for every run, prepared as the trained model's config says.
    prepared = prepare_split(stored_config(home / "ck"), args.category, "test")
    runs = {name: _score(home / "ck", cfg, prepared, dev, amp, tf32)
            for name, dev, amp, tf32 in variants}
    ref = runs["cpu fp32"]
    device = torch.cuda.get_device_name() if cuda else "no CUDA device (CPU rows only)"
    lines = [f"{args.preset} preset, {args.category}, {len(ref['labels'])} test images at "
             f"{probe.data.image_size} px, {device}, torch {torch.__version__}",
             "", "| run | max |diff| / range: Eq. 11 map | KL term | feature term | image score "
             "| pixel AUROC | image AUROC |", "|---|---|---|---|---|---|---|"]
    records = []
    for name, run in runs.items():
        rel = {m: float(np.abs(run[m] - ref[m]).max() / max(np.ptp(ref[m]), 1e-12)) for m in MAPS}
        rel["image_score"] = float(np.abs(run["image_score"] - ref["image_score"]).max()
                                   / max(np.ptp(ref["image_score"]), 1e-12))
        pix = pixel_auroc(run["anomaly_map"], run["masks"])
        img = image_auroc(run["image_score"], run["labels"])
        records.append({"run": name, **rel, "pixel_auroc": pix, "image_auroc": img})
        lines.append(f"| {name} | {rel['anomaly_map']:.2e} | {rel['kl_map']:.2e} | "
                     f"{rel['feature_map']:.2e} | {rel['image_score']:.2e} | {100 * pix:.2f} | "
                     f"{100 * img:.2f} |")
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"preset": args.preset, "device": device,
                      "torch": torch.__version__, "rows": records}))
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
