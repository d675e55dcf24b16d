#!/usr/bin/env bash
# Run 1 of this session on one H200: the decode part of bench/run-gpu.sh (GPU tests, then
# generation of the SmolLM2-135M and Llama-3.2-1B configs with CUDA graphs and without,
# interleaved twice, and transformers `generate` at batch 1 and 8), from the repo root after
# scripts/build-cuda.sh and `xz -k dist/cuda/metal-candle`:
#   bash bench/results/h200-2026-12-03-session6/command.sh OUT
exec bash bench/run-gpu.sh "$1" decode
