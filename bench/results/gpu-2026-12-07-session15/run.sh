#!/usr/bin/env bash
# Session 15 on the GPU machine: the GPU tests of the new build (the forward merge only for
# large outputs, the cluster kernel for the seed's shapes); LoRA linear at 8×2048×4096 (bf16,
# f16; forward and backward, each timed interleaved with its bare GEMM) for the new build and
# BASE (no merged forward), alternated; the seed's shapes for the new build and VEC (the vector
# kernel instead of the cluster one), alternated, and once more in the other dtype order; LoRA
# training throughput of the new build and BASE, alternated. Everything lands in OUT/s15.tar.gz.
#   [ROUNDS=2] bash bench/results/gpu-2026-12-07-session15/run.sh OUT NEW_XZ BASE_XZ VEC_XZ
out=$1; mkdir -p "$out/s15"; res=$out/s15
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
xz -dc "$2" > /tmp/mc-new; xz -dc "$3" > /tmp/mc-base; xz -dc "$4" > /tmp/mc-vec
chmod +x /tmp/mc-new /tmp/mc-base /tmp/mc-vec
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 240 "$@"; echo "== $name: exit code $?"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$res/gpu.txt"
{
run "gpu-test" /tmp/mc-new gpu-test
for round in $(seq "${ROUNDS:-2}"); do
  for side in new base; do
    run "lora $side $round" /tmp/mc-$side bench ops --device cuda --ops lora_linear --modes fwd,bwd \
      --shapes large --dtypes bf16,f16 --seconds 1 --json "$res/lora-$side-$round.json"
  done
  for side in new vec; do
    run "seed $side $round" /tmp/mc-$side bench ops --device cuda --ops lora_delta,lora_linear --modes fwd \
      --shapes small --dtypes f32,bf16 --seconds 1 --json "$res/seed-$side-$round.json"
  done
done
run "seed new bf16-first" /tmp/mc-new bench ops --device cuda --ops lora_delta --modes fwd \
  --shapes small --dtypes bf16,f32 --seconds 1 --json "$res/seed-new-bf16-first.json"
for cfg in ${TRAIN_CONFIGS-smollm2-135m llama-1b}; do
  for round in $(seq "${ROUNDS:-2}"); do
    for side in new base; do
      run "bench-train $cfg $side $round" /tmp/mc-$side bench-train --config $cfg --batch 8 --seq 512 \
        --rank 16 --device cuda --dtype bf16 --json "$res/train-$side-$cfg-$round.json"
    done
  done
done
} > "$res/run.log" 2>&1
tar -C "$out" -czf "$out/s15.tar.gz" s15 && rm -rf "$res"
tar -xzOf "$out/s15.tar.gz" s15/gpu.txt
tar -xzOf "$out/s15.tar.gz" s15/run.log | grep -E "passed|failed|FAIL|exit code [^0]|median ratio" | tail -40
tar -xzOf "$out/s15.tar.gz" s15/run.log | grep -E "^== seed|^lora_delta .*fused |^lora_linear .*(fused|base_gemm) .*latency" | tail -80
mkdir -p /tmp/t && tar -C /tmp/t -xzf "$out/s15.tar.gz"
for f in /tmp/t/s15/train-*.json; do echo "$(basename "$f" .json) $(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['tokens_per_s']))" "$f")"; done
