"""Training and scoring throughput of a preset: steps/s, images/s, peak memory.

Meant for a GPU with the ``paper`` preset (METHOD.md §2: 256 px ADM, batch 2):

    .venv/bin/python bench/bench_train_score.py --preset paper --steps 50 --out bench/bench_paper_gpu.txt

It trains ``--steps`` iterations on the synthetic dataset (generated at the preset's image size,
one category) through the same use case as ``diffad train`` (so ``paper`` fine-tunes from the
ImageNet ADM checkpoint: give a local copy with ``--set train.init_checkpoint=PATH`` or let it
download; ``--set train.init_checkpoint=null`` trains from scratch), then scores that category's test split, and
prints one table. Random backbone weights are used unless ``--pretrained`` is given (throughput
does not depend on them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--category", default="washer")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="diffad-bench-"))
    os.environ["DIFFAD_HOME"] = str(home)
    import torch

    from diffad_core.config import load_config
    from diffad_core.data import prepare_split, resolve_dataset
    from diffad_core.provenance import device_info, library_versions
    from diffad_core.score import score_split
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
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    start = time.perf_counter()
    result = train_category(cfg, [args.category], home / "ck", resume=False, progress=True)
    train_s = time.perf_counter() - start
    train_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    ev = load_for_evaluation(home / "ck")
    prepared = prepare_split(ev.cfg, args.category, "test")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    n = sum(1 for _ in score_split(ev.model, prepared, ev.cfg.score, alpha=ev.cfg.score.alpha,
                                   progress=False))
    if cuda:
        torch.cuda.synchronize()
    score_s = time.perf_counter() - start
    score_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    versions = library_versions()
    lines = [
        f"preset {args.preset} ({size} px, batch {cfg.train.batch_size}), {args.steps} training steps,"
        f" device {device_info()}, torch {versions.get('torch')}",
        f"overrides: {' '.join(args.overrides) or '-'}",
        f"init: {result.init_report[0] if result.init_report else 'from scratch'}",
        f"train: {result.steps} steps in {train_s:.1f} s (incl. PaDiM fit) = "
        f"{result.steps / train_s:.2f} steps/s; peak GPU memory {train_peak:.1f} GiB",
        f"score: {n} images in {score_s:.1f} s = {n / score_s:.2f} images/s "
        f"(3 timesteps each); peak GPU memory {score_peak:.1f} GiB",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
