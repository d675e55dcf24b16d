#!/usr/bin/env bash
# The A/B of this session on one H200 (device time was short: the lean form of
# `bench/run-gpu.sh OUT ab`): GPU tests of the new build; the row ops' forward (softmax,
# rms_norm, layer_norm; all shape classes) of the base build (dist/cuda/metal-candle-base.xz)
# and the new one, interleaved twice; LoRA training of both builds and PyTorch + PEFT.
#   bash bench/results/h200-2026-12-03-session5/command.sh OUT
out=$1; mkdir -p "$out"
venv_lib="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')"
export LD_LIBRARY_PATH="$venv_lib:${LD_LIBRARY_PATH:-}"
new=/tmp/mc-new; base=/tmp/mc-base
xz -dc dist/cuda/metal-candle.xz > $new; xz -dc dist/cuda/metal-candle-base.xz > $base; chmod +x $new $base
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$out/gpu.txt"
timeout 120 $new gpu-test > "$out/gpu-test.txt" 2>&1; echo "gpu-test rc $?" >> "$out/gpu-test.txt"
for round in 1 2; do
  for side in base new; do
    exe=$new; [ $side = base ] && exe=$base
    timeout 90 $exe bench ops --device cuda --ops softmax,rms_norm,layer_norm --modes fwd --seconds 0.2 \
      --json "$out/ops-$side-$round.json" > "$out/ops-$side-$round.txt" 2>&1
  done
done
for cfg in smollm2-135m llama-1b; do
  for side in base new; do
    exe=$new; [ $side = base ] && exe=$base
    timeout 90 $exe bench-train --config $cfg --batch 8 --seq 512 --rank 16 --device cuda --dtype bf16 \
      --json "$out/train-$side-$cfg.json" > "$out/train-$side-$cfg.txt" 2>&1
  done
  timeout 90 python3 bench/peers/train_peft.py --config $cfg --batch 8 --seq 512 --rank 16 \
    --json "$out/train-peft-$cfg.json" > "$out/train-peft-$cfg.txt" 2>&1
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> "$out/gpu.txt"
