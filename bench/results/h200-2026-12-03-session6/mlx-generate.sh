#!/usr/bin/env bash
# Run 2 of this session: generation with CUDA graphs against mlx-lm (MLX's CUDA backend) on
# the same lease. MLX travels in two parts (bench/pack-mlx.sh); the first is copied to
# ~/mlxparts by an earlier call, then:
#   cat ~/mlxparts/mlx.part1 dist/mlx/mlx.part2 | xz -dc | tar -x -C ~
#   MLX_SITE=~/site bash bench/results/h200-2026-12-03-session6/mlx-generate.sh OUT
out=$1; mkdir -p "$out"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export PYTHONPATH="$MLX_SITE${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:$torch_nvidia/cudnn/lib:$torch_nvidia/nccl/lib:${LD_LIBRARY_PATH:-}"
bin=/tmp/mc-new; xz -dc dist/cuda/metal-candle.xz > $bin; chmod +x $bin
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 150 "$@"; echo "== $name: exit code $?"; }
{
for cfg in smollm2-135m llama-1b; do
  for round in 1 2; do
    run "bench generate $cfg $round" $bin bench generate --config $cfg --batch 1,8 --prompt 128 --new 128 \
      --device cuda --dtype bf16 --json
    for b in 1 8; do
      run "mlx-lm generate $cfg batch $b $round" python3 bench/peers/generate_mlx.py --config $cfg --batch $b \
        --prompt 128 --new 128 --json
    done
  done
done
} > "$out/run-mlx-generate.log" 2>&1
