#!/usr/bin/env bash
# Issue #11's GPU check in one command (for a session lent a GPU; about 10 minutes on an H100/H200):
#
#     bash bench/gpu_check.sh
#
# Three runs of bench/bench_train_score.py with the paper preset (from scratch: no download; 10
# Algorithm 1 rounds instead of 100), each appending one JSON line to $OUT/bench_train_score.jsonl
# ($OUT: the device tool's output folder; bench/ when unset): as configured (NCHW on CUDA, bf16
# autocast where the preset asks for it), with channels-last weights, and with torch.compile.
set -euo pipefail
PY=${PY:-.venv/bin/python}
RESULTS=${OUT:-bench}/bench_train_score.jsonl
common=(--preset paper --steps 30 --recon-images 4 --results "$RESULTS"
        --set train.init_checkpoint=null --set reconstruct.rounds=10)
"$PY" bench/bench_train_score.py "${common[@]}"
"$PY" bench/bench_train_score.py "${common[@]}" --set runtime.channels_last=on
"$PY" bench/bench_train_score.py "${common[@]}" --set runtime.compile_unet=true
