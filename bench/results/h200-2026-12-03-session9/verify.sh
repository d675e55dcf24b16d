#!/usr/bin/env bash
# Session 9, one H200: the new build's GPU tests; the LoRA ops at the seed shapes (call latency)
# and the norms forward and backward at the large shape, against the build before (BASE_XZ).
#   bash bench/results/h200-2026-12-03-session9/verify.sh OUT BASE_XZ
out=$1; base_xz=$2; mkdir -p "$out"
new=/tmp/mc-new; base=/tmp/mc-base
xz -dc dist/cuda/metal-candle.xz > $new; xz -dc "$base_xz" > $base; chmod +x $new $base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 200 "$@"; echo "== $name: exit code $?"; }
{
run "gpu-test" $new gpu-test
for side in base new; do
  exe=$new; [ $side = base ] && exe=$base
  run "seed lora $side" $exe bench ops --device cuda --ops lora_delta,lora_linear --modes fwd \
    --shapes small --dtypes f32,bf16 --seconds 0.2 --json "$out/lora-$side.json"
  run "norms $side" $exe bench ops --device cuda --ops rms_norm,layer_norm --modes fwd,bwd \
    --shapes large --dtypes f32,bf16 --seconds 0.2 --json "$out/norms-$side.json"
done
} > "$out/run.log" 2>&1
