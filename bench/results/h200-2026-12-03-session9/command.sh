#!/usr/bin/env bash
# Session 9, one H200, the build as committed, against the build before the session (BASE_XZ),
# with PyTorch and MLX in the same lease. MLX first unpacked from bench/pack-mlx.sh's parts:
#   cat ~/mlxparts/mlx.part1 dist/mlx/mlx.part2 | xz -dc | tar -x -C ~
#   MLX_SITE=~/site bash bench/results/h200-2026-12-03-session9/command.sh OUT BASE_XZ
# 1. GPU tests of the new build.
# 2. Row ops (softmax, rms_norm, layer_norm) forward and backward, and the LoRA ops forward, at
#    the seed and large shapes, f32 and bf16: base and new interleaved twice.
# 3. All ops of the new build at the seed and large shapes, PyTorch and MLX, merged by compare.py.
# 4. Training (bf16, batch 8 × 512, r 16) of both builds.
out=$1; base_xz=$2; mkdir -p "$out"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:$torch_nvidia/cudnn/lib:$torch_nvidia/nccl/lib:${LD_LIBRARY_PATH:-}"
new=/tmp/mc-new; base=/tmp/mc-base
xz -dc dist/cuda/metal-candle.xz > $new; xz -dc "$base_xz" > $base; chmod +x $new $base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 150 "$@"; echo "== $name: exit code $?"; }
{
run "gpu-test" $new gpu-test
for round in 1 2; do
  for side in base new; do
    exe=$new; [ $side = base ] && exe=$base
    run "row ops $side $round" $exe bench ops --device cuda --ops softmax,rms_norm,layer_norm --modes fwd,bwd \
      --shapes small,large --dtypes f32,bf16 --seconds 0.2 --json "$out/rows-$side-$round.json"
    run "lora ops $side $round" $exe bench ops --device cuda --ops lora_delta,lora_linear --modes fwd \
      --shapes small,large --dtypes f32,bf16 --seconds 0.2 --json "$out/lora-$side-$round.json"
  done
done
if [ -n "${MLX_SITE:-}" ]; then
  PYTHONPATH="$MLX_SITE${PYTHONPATH:+:$PYTHONPATH}" run "MLX peer (ops)" python3 bench/peers/mlx_ops.py \
    --shapes small,large --seconds 0.2 --json "$out/mlx.json"
fi
run "metal-candle bench ops" $new bench ops --device cuda --seconds 0.2 --shapes small,large --json "$out/metal-candle.json"
run "PyTorch peer (ops)" python3 bench/peers/pytorch_ops.py --seconds 0.2 --shapes small,large --json "$out/pytorch.json"
run "compare" python3 bench/compare.py "$out/metal-candle.json" "$out/pytorch.json" $( [ -e "$out/mlx.json" ] && echo "$out/mlx.json") \
  --md "$out/compare.md" --png "$out/compare.png"
for cfg in smollm2-135m llama-1b; do
  for side in base new; do
    exe=$new; [ $side = base ] && exe=$base
    run "bench-train $cfg $side" $exe bench-train --config $cfg --batch 8 --seq 512 --rank 16 --device cuda \
      --dtype bf16 --json "$out/train-$side-$cfg.json"
  done
done
} > "$out/run.log" 2>&1
