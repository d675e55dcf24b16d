#!/usr/bin/env bash
# Session 9, a sixth lease: the build whose CUDA LoRA forward keeps scale·x·A for the backward.
# Its GPU tests; the LoRA ops at 8×2048×4096, bf16, forward and backward (with the interleaved
# LoRA-linear / bare-GEMM ratios), twice; training of the build before the session (BASE_XZ)
# and this one, interleaved twice.
#   bash bench/results/h200-2026-12-03-session9/saved.sh OUT BASE_XZ
out=$1; base_xz=$2; mkdir -p "$out"
new=/tmp/mc-new; base=/tmp/mc-base
xz -dc dist/cuda/metal-candle.xz > $new; xz -dc "$base_xz" > $base; chmod +x $new $base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 150 "$@"; echo "== $name: exit code $?"; }
{
run "gpu-test" $new gpu-test
for round in 1 2; do
  run "lora ops $round" $new bench ops --device cuda --ops lora_delta,lora_linear --modes fwd,bwd --shapes large \
    --dtypes bf16 --seconds 1 --json "$out/lora-$round.json"
done
for round in 1 2; do
  for cfg in smollm2-135m llama-1b; do
    for side in base new; do
      exe=$new; [ $side = base ] && exe=$base
      run "bench-train $cfg $side $round" $exe bench-train --config $cfg --batch 8 --seq 512 --rank 16 --device cuda \
        --dtype bf16 --json "$out/train-$side-$cfg-$round.json"
    done
  done
done
} > "$out/run.log" 2>&1
