#!/usr/bin/env bash
# Packs MLX (CUDA 13 backend) and mlx-lm for the GPU machine, which has no network and takes at
# most 64 MiB per call: downloads the wheels here, unpacks them,
# compresses them and splits the archive in two, dist/mlx/mlx.part1 and dist/mlx/mlx.part2.
# On the GPU machine: cat the parts (the first carried in one call and copied to the home
# folder, the second carried in the next call while the machine is still held), untar, and
# pass the folder as MLX_SITE to `bench/run-gpu.sh OUT mlx`.
#
#   bench/pack-mlx.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_35_x86_64 mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 -d "$work/wheels"
mkdir -p "$work/site"
for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/site/"; done
# Keep mlx/include/cccl: MLX compiles some kernels at run time (NVRTC) against the CCCL headers
# it finds next to libmlx.so. Its C++ API headers and CUTLASS/CuTe (for kernels these
# benchmarks do not reach: quantized matmuls, sm70 GEMMs) stay out to keep the carry small.
rm -rf "$work/site/mlx/share" "$work/site/mlx/include/mlx" "$work/site/mlx/include/cutlass" \
  "$work/site/mlx/include/cute"
mkdir -p "$root/dist/mlx"
tar -cf - -C "$work" site | xz -T0 -6 > "$work/mlx.tar.xz"
split -b 38000000 -d -a 1 "$work/mlx.tar.xz" "$work/part"
[ ! -e "$work/part2" ] || { echo "the archive needs more than two parts" >&2; exit 1; }
mv "$work/part0" "$root/dist/mlx/mlx.part1"
mv "$work/part1" "$root/dist/mlx/mlx.part2"
rm -rf "$work"
ls -l "$root/dist/mlx"
