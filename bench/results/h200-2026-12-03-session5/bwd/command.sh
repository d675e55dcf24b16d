#!/usr/bin/env bash
# Norm backward with the next row prefetched (new) against the kept build (base), one H200:
# GPU tests of the new build, then rms_norm/layer_norm backward at the mid and large shapes,
# interleaved twice, and one Llama-1B-shape training step of each.
#   bash bench/results/h200-2026-12-03-session5/bwd/command.sh OUT
out=$1; mkdir -p "$out"
venv_lib="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')"
export LD_LIBRARY_PATH="$venv_lib:${LD_LIBRARY_PATH:-}"
new=/tmp/mc-new; base=/tmp/mc-base
xz -dc dist/cuda/metal-candle.xz > $new; xz -dc dist/cuda/metal-candle-base.xz > $base; chmod +x $new $base
timeout 100 $new gpu-test > "$out/gpu-test.txt" 2>&1; echo "gpu-test rc $?" >> "$out/gpu-test.txt"
for round in 1 2; do
  for side in base new; do
    exe=$new; [ $side = base ] && exe=$base
    timeout 40 $exe bench ops --device cuda --ops rms_norm,layer_norm --modes bwd --shapes mid,large \
      --seconds 0.2 --json "$out/ops-$side-$round.json" > /dev/null 2>&1
  done
done
for side in base new; do
  exe=$new; [ $side = base ] && exe=$base
  timeout 40 $exe bench-train --config llama-1b --batch 8 --seq 512 --rank 16 --device cuda --dtype bf16 \
    --json "$out/train-$side-llama-1b.json" > /dev/null 2>&1
done
