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
# Keep mlx/include: MLX compiles some kernels at run time (NVRTC) against its bundled CCCL,
# CUTLASS and CuTe headers, found next to libmlx.so.
rm -rf "$work/site/mlx/share"
mkdir -p "$root/dist/mlx"
tar -cf - -C "$work" site | xz -T0 -6 > "$work/mlx.tar.xz"
split -b 38000000 -d -a 1 "$work/mlx.tar.xz" "$work/part"
mv "$work/part0" "$root/dist/mlx/mlx.part1"
mv "$work/part1" "$root/dist/mlx/mlx.part2"
rm -rf "$work"
ls -l "$root/dist/mlx"
