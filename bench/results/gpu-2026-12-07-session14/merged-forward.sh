#!/usr/bin/env bash
# Session 14, the LoRA linear forward through the merged weight (T on the side stream): the GPU
# tests of the new build, then LoRA linear at 8×2048×4096 (bf16, f16; forward and backward, each
# timed interleaved with its bare GEMM) for the new build and session 13's, alternated three
# times, the new build's seed-shape latency, LoRA training throughput of both builds, and (given HOST_XZ,
# the host_path example of the new build) where a seed-shape call's latency goes.
#   [ROUNDS=3] [TRAIN_CONFIGS="smollm2-135m llama-1b"] \
#   bash bench/results/gpu-2026-12-07-session14/merged-forward.sh OUT NEW_XZ BASE_XZ [HOST_XZ]
out=$1; mkdir -p "$out"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
xz -dc "$2" > /tmp/mc-new; xz -dc "$3" > /tmp/mc-base; chmod +x /tmp/mc-new /tmp/mc-base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 240 "$@"; echo "== $name: exit code $?"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$out/gpu.txt"
{
run "gpu-test" /tmp/mc-new gpu-test
for round in $(seq "${ROUNDS:-3}"); do
  for side in new base; do
    run "lora $side $round" /tmp/mc-$side bench ops --device cuda --ops lora_linear --modes fwd,bwd \
      --shapes large --dtypes bf16,f16 --seconds 1 --json "$out/lora-$side-$round.json"
  done
done
for side in new; do
  run "seed $side" /tmp/mc-$side bench ops --device cuda --ops lora_delta,lora_linear --modes fwd \
    --shapes small --dtypes f32,bf16 --seconds 1 --json "$out/seed-$side.json"
done
if [ -n "${4:-}" ]; then
  xz -dc "$4" > /tmp/host_path; chmod +x /tmp/host_path
  for k in 2048 512; do run "host_path $k" /tmp/host_path $k 2000; done > "$out/host-path.txt" 2>&1
fi
for cfg in ${TRAIN_CONFIGS-smollm2-135m llama-1b}; do
  for side in new base; do
    run "bench-train $cfg $side" /tmp/mc-$side bench-train --config $cfg --batch 8 --seq 512 --rank 16 \
      --device cuda --dtype bf16 --json "$out/train-$side-$cfg.json"
  done
done
} > "$out/run.log" 2>&1
cat "$out/gpu.txt"
grep -E "ratio|passed|failed|FAIL|exit code [^0]" "$out/run.log" | tail -40
grep -E "^lora" "$out/run.log" | grep -E "latency|1x128" | tail -24
cat "$out/host-path.txt" 2>/dev/null
for f in "$out"/train-*.json; do echo "$(basename "$f" .json) $(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['tokens_per_s']))" "$f")"; done
