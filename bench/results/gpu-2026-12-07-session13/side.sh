#!/usr/bin/env bash
# Session 13, the LoRA linear backward's memory passes on a second stream: the lab (sidelab:
# the backward and forward sequences on one and two streams, interleaved with their bare
# GEMMs; first, so that a run cut short still holds it), the GPU tests of the new build, then
# LoRA linear at 8×2048×4096 (bf16, f16; forward and backward, each timed interleaved with its
# bare GEMM) and LoRA training throughput for the new build and session 12's, alternated.
#   bash bench/results/gpu-2026-12-07-session13/side.sh OUT LAB NEW_XZ BASE_XZ
out=$1; mkdir -p "$out"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
xz -dc "$3" > /tmp/mc-new; xz -dc "$4" > /tmp/mc-base; chmod +x /tmp/mc-new /tmp/mc-base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 240 "$@"; echo "== $name: exit code $?"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$out/gpu.txt"
run "lab" "$2" > "$out/sidelab.txt" 2>&1
{
run "gpu-test" /tmp/mc-new gpu-test
for round in 1 2 3; do
  for side in new base; do
    run "lora $side $round" /tmp/mc-$side bench ops --device cuda --ops lora_linear --modes fwd,bwd \
      --shapes large --dtypes bf16,f16 --seconds 1 --json "$out/lora-$side-$round.json"
  done
done
for round in 1; do
  for cfg in smollm2-135m llama-1b; do
    for side in new base; do
      run "bench-train $cfg $side $round" /tmp/mc-$side bench-train --config $cfg --batch 8 --seq 512 --rank 16 \
        --device cuda --dtype bf16 --json "$out/train-$side-$cfg-$round.json"
    done
  done
done
} > "$out/run.log" 2>&1
cat "$out/gpu.txt"; cat "$out/sidelab.txt"
grep -E "ratio|passed|failed|FAIL|exit code [^0]" "$out/run.log" | tail -40
for f in "$out"/train-*.json; do echo "$(basename "$f" .json) $(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['tokens_per_s']))" "$f")"; done | tee "$out/train-tokens-per-s.txt"
