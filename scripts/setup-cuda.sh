#!/usr/bin/env bash
# Prepare a CUDA 13.0 toolchain from PyPI so that the `cuda` feature builds on a machine with
# no GPU and no CUDA toolkit (the development and CI machines). Idempotent.
#
#   source scripts/setup-cuda.sh          # sets CUDA_HOME, PATH, CUDA_COMPUTE_CAP
#   cargo build --release --features cuda
#
# Users with a real CUDA toolkit do not need this: set CUDA_HOME and CUDA_COMPUTE_CAP and build.
# Versions are pinned to 13.0: the lent GPUs run driver 580 (CUDA 13.0), which rejects PTX
# newer than ISA 9.0, and cudarc 0.19 rejects nvcc 13.5.
set -euo pipefail
_mc_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_mc_cuda="${METAL_CANDLE_CUDA_DIR:-$_mc_root/.cuda}"
if [ ! -e "$_mc_cuda/home/bin/nvcc" ]; then
  mkdir -p "$_mc_cuda"
  python3 -m pip install -q --disable-pip-version-check --target "$_mc_cuda/site" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
  cu="$_mc_cuda/site/nvidia/cu13"
  home="$_mc_cuda/home"
  mkdir -p "$home/lib64"
  ln -sfn "$cu/bin" "$home/bin"
  ln -sfn "$cu/include" "$home/include"
  ln -sfn "$cu/nvvm" "$home/nvvm"
  for so in "$cu"/lib/*.so.*; do
    base="$(basename "$so")"
    ln -sfn "$so" "$home/lib64/$base"
    ln -sfn "$so" "$home/lib64/${base%%.so.*}.so"
  done
  # libcuda.so ships only with the driver: link against a stand-in whose every entry point
  # returns CUDA_ERROR_STUB_LIBRARY (34). At run time the real driver library is loaded instead.
  python3 "$_mc_root/scripts/gen_cuda_stub.py" "$cu/include/cuda.h" > "$_mc_cuda/cuda_stub.c"
  gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$home/lib64/libcuda.so.1" "$_mc_cuda/cuda_stub.c"
  ln -sfn libcuda.so.1 "$home/lib64/libcuda.so"
  ls "$home/bin/nvcc" >/dev/null
fi
export CUDA_HOME="$_mc_cuda/home"
export CUDA_PATH="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$CUDA_HOME/lib64:${LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
