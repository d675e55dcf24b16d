#!/usr/bin/env bash
# Build the CUDA binaries from a fresh clone on a machine without a GPU or CUDA toolkit
# (CUDA 13.0 comes from PyPI through scripts/setup-cuda.sh), strip them, and put them in
# dist/cuda/metal-candle: the CLI, which carries the GPU test suite (`metal-candle gpu-test`,
# the checks of crates/metal-candle/tests/gpu.rs; fails when no GPU is usable) and the
# benchmarks (`metal-candle bench ops --device cuda --json FILE`).
#
#   scripts/build-cuda.sh                 # Hopper (H100/H200): CUDA_COMPUTE_CAP=90
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh   # e.g. A100
#
# With a real CUDA toolkit, set CUDA_HOME (and CUDA_COMPUTE_CAP) before running: the
# PyPI download is skipped when $CUDA_HOME/bin/nvcc exists. See docs/CUDA.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export PATH="$CUDA_HOME/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
else
  # shellcheck source=scripts/setup-cuda.sh
  source scripts/setup-cuda.sh
fi
target="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release --features cuda -p metal-candle-cli
mkdir -p dist/cuda
cp "$target/release/metal-candle" dist/cuda/metal-candle
strip dist/cuda/metal-candle
ls -l dist/cuda
