#!/usr/bin/env bash
# Session 9, a second lease: training throughput of both builds interleaved three times (one
# run per build in final/ disagreed by 35% for SmolLM2 in all three phases of the step,
# optimizer included), and the seed-shape LoRA ops of both builds twice more.
#   bash bench/results/h200-2026-12-03-session9/rerun.sh OUT BASE_XZ
out=$1; base_xz=$2; mkdir -p "$out"
new=/tmp/mc-new; base=/tmp/mc-base
xz -dc dist/cuda/metal-candle.xz > $new; xz -dc "$base_xz" > $base; chmod +x $new $base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 150 "$@"; echo "== $name: exit code $?"; }
{
for round in 1 2 3; do
  for cfg in smollm2-135m llama-1b; do
    for side in base new; do
      exe=$new; [ $side = base ] && exe=$base
      run "bench-train $cfg $side $round" $exe bench-train --config $cfg --batch 8 --seq 512 --rank 16 --device cuda \
        --dtype bf16 --json "$out/train-$side-$cfg-$round.json"
    done
  done
done
for round in 1 2; do
  for side in base new; do
    exe=$new; [ $side = base ] && exe=$base
    run "lora ops $side $round" $exe bench ops --device cuda --ops lora_delta,lora_linear --modes fwd \
      --shapes small,large --dtypes f32,bf16 --seconds 0.2 --json "$out/lora-$side-$round.json"
  done
done
} > "$out/run.log" 2>&1
