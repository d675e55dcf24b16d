#!/usr/bin/env bash
# Session 11, first library run of the merged-weight LoRA linear backward: the GPU tests of the
# new build, then LoRA linear at 8×2048×4096 (bf16, f16; forward and backward, each timed
# interleaved with its bare GEMM) for the new build and session 10's, alternated twice.
#   bash bench/results/h200-2026-12-04-session11/merged.sh OUT NEW_XZ BASE_XZ
out=$1; mkdir -p "$out"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
xz -dc "$2" > /tmp/mc-new; xz -dc "$3" > /tmp/mc-base; chmod +x /tmp/mc-new /tmp/mc-base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 240 "$@"; echo "== $name: exit code $?"; }
{
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
run "gpu-test" /tmp/mc-new gpu-test
for round in 1 2; do
  for side in new base; do
    run "lora $side $round" /tmp/mc-$side bench ops --device cuda --ops lora_linear --modes fwd,bwd \
      --shapes large --dtypes bf16,f16 --seconds 1 --json "$out/lora-$side-$round.json"
  done
done
} > "$out/run.log" 2>&1
grep -E "ratio|passed|failed|FAIL|exit code" "$out/run.log" | tail -40
