#!/usr/bin/env bash
# Session 12, the final build on one GPU: its GPU tests, the kernel lab's `merge` mode, LoRA
# linear at 8×2048×4096 (bf16, f16; forward and backward, each timed interleaved with its bare
# GEMM) for it and session 11's build alternated twice, the seed-shape latencies, and training
# throughput of both builds (SmolLM2-135M and Llama-3.2-1B shapes, batch 8 × 512, rank 16, bf16).
#   bash bench/results/gpu-2026-12-06-session12/final.sh OUT LAB NEW_XZ BASE_XZ
out=$1; mkdir -p "$out"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
xz -dc "$3" > /tmp/mc-new; xz -dc "$4" > /tmp/mc-base; chmod +x /tmp/mc-new /tmp/mc-base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 200 "$@"; echo "== $name: exit code $?"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$out/gpu.txt"
{
run "gpu-test" /tmp/mc-new gpu-test
lora_round() {
  for side in new base; do
    run "lora $side $1" /tmp/mc-$side bench ops --device cuda --ops lora_linear --modes fwd,bwd \
      --shapes large --dtypes bf16,f16 --seconds 1 --json "$out/lora-$side-$1.json"
  done
}
lora_round 1
run "seed" /tmp/mc-new bench ops --device cuda --ops lora_delta,lora_linear --shapes small --dtypes f32,bf16 \
  --modes fwd --seconds 0.5 --json "$out/seed.json"
run "lab" "$2" merge
for cfg in smollm2-135m llama-1b; do
  for side in new base; do
    run "bench-train $cfg $side" /tmp/mc-$side bench-train --config $cfg --batch 8 --seq 512 --rank 16 \
      --device cuda --dtype bf16 --json "$out/train-$side-$cfg.json"
  done
done
lora_round 2
} > "$out/run.log" 2>&1
cat "$out/gpu.txt"
grep -E "passed|failed|FAIL|ratio|merge  W|session 11 \(|exit code [1-9]|lora_delta .*fused|tokens" "$out/run.log" | grep -v "^check" | tail -60
for f in "$out"/train-*.json; do echo "$(basename "$f" .json) $(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['tokens_per_s']))" "$f")"; done
