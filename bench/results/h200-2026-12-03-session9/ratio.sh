#!/usr/bin/env bash
# Session 9, a fifth lease: LoRA linear at 8×2048×4096 (bf16 and f32, r = 16), forward and
# backward, three times; each run also times the fused layer against the bare GEMM in
# alternating batches (`interleaved_ratios` in the JSON).
#   bash bench/results/h200-2026-12-03-session9/ratio.sh OUT
out=$1; mkdir -p "$out"
new=/tmp/mc-new
xz -dc dist/cuda/metal-candle.xz > $new; chmod +x $new
for round in 1 2 3; do
  echo "== round $round ($(date +%T))"
  timeout 150 $new bench ops --device cuda --ops lora_linear --modes fwd,bwd --shapes large --dtypes bf16,f32 \
    --seconds 1 --json "$out/ratio-$round.json"
  echo "== round $round: exit code $?"
done > "$out/run.log" 2>&1
