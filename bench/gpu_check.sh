#!/usr/bin/env bash
# The GPU checks in one command, for a session lent a GPU:
#
#     bash bench/gpu_check.sh
#
# First bench/gpu_parity.py: one small paper-preset model scores the same images on the CPU and on
# CUDA (fp32, TF32, bf16, fp16) -> $OUT/gpu_parity.txt. Then three runs of
# bench/bench_train_score.py with the paper preset (from scratch: no download; 10 Algorithm 1
# rounds instead of 100), each appending one JSON line to $OUT/bench_train_score.jsonl: as
# configured (NCHW on CUDA, bf16 autocast where the preset asks for it), with channels-last
# weights, and with torch.compile. $OUT: the device tool's output folder; bench/ when unset.
# PY: the Python to use (default .venv/bin/python; on the device machine its python3, with
# PYTHONPATH naming this checkout and the carried wheels).
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEST=${OUT:-bench}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
"$PY" bench/gpu_parity.py --preset paper --out "$DEST/gpu_parity.txt"
RESULTS=$DEST/bench_train_score.jsonl
common=(--preset paper --steps 30 --recon-images 4 --results "$RESULTS"
        --set train.init_checkpoint=null --set reconstruct.rounds=10)
"$PY" bench/bench_train_score.py "${common[@]}"
"$PY" bench/bench_train_score.py "${common[@]}" --set runtime.channels_last=on
"$PY" bench/bench_train_score.py "${common[@]}" --set runtime.compile_unet=true
