#!/usr/bin/env bash
# MLX side of this session (the lean form of `bench/run-gpu.sh OUT mlx`, without the
# transformers generation runs, which earlier sessions measured): ops of the new build, PyTorch
# and MLX in one run, merged by compare.py; generation of the new build and of mlx-lm.
#   cat ~/mlxparts/mlx.part1 dist/mlx/mlx.part2 | xz -dc | tar -x -C ~
#   MLX_SITE=~/site bash bench/results/h200-2026-12-03-session5/mlx.sh OUT
out=$1; mkdir -p "$out"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export PYTHONPATH="$MLX_SITE${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:$torch_nvidia/cudnn/lib:$torch_nvidia/nccl/lib:${LD_LIBRARY_PATH:-}"
bin=/tmp/mc-new; xz -dc dist/cuda/metal-candle.xz > $bin; chmod +x $bin
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 150 "$@"; echo "== $name: exit code $?"; }
{
run "MLX peer (ops)" python3 bench/peers/mlx_ops.py --shapes small,large --seconds 0.2 --json "$out/mlx.json"
run "metal-candle bench ops" $bin bench ops --device cuda --seconds 0.2 --shapes small,large --json "$out/metal-candle.json"
run "PyTorch peer (ops)" python3 bench/peers/pytorch_ops.py --seconds 0.2 --shapes small,large --json "$out/pytorch.json"
run "compare" python3 bench/compare.py "$out/metal-candle.json" "$out/pytorch.json" "$out/mlx.json" \
  --md "$out/compare.md" --png "$out/compare.png"
for cfg in smollm2-135m llama-1b; do
  run "bench generate $cfg" $bin bench generate --config $cfg --batch 1,8 --prompt 128 --new 128 --device cuda --dtype bf16 --json
  for b in 1 8; do
    run "mlx-lm generate $cfg batch $b" python3 bench/peers/generate_mlx.py --config $cfg --batch $b --prompt 128 --new 128 --json
  done
done
} > "$out/run-mlx.log" 2>&1
