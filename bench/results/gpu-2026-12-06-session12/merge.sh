#!/usr/bin/env bash
# Session 12, the merge kernel and the gradient sums: the kernel lab in its `merge` mode (the
# merge's variants and tile counts, the sums, the backward sequences against session 11's),
# the GPU tests of the new build, then LoRA linear at 8×2048×4096 (bf16, f16; forward and
# backward, each timed interleaved with its bare GEMM) for the new build and session 11's,
# alternated twice.
#   bash bench/results/gpu-2026-12-06-session12/merge.sh OUT LAB NEW_XZ BASE_XZ
out=$1; mkdir -p "$out"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
xz -dc "$3" > /tmp/mc-new; xz -dc "$4" > /tmp/mc-base; chmod +x /tmp/mc-new /tmp/mc-base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 240 "$@"; echo "== $name: exit code $?"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$out/gpu.txt"
run "lab" "$2" merge > "$out/tclab-merge.txt" 2>&1
{
run "gpu-test" /tmp/mc-new gpu-test
for round in 1 2; do
  for side in new base; do
    run "lora $side $round" /tmp/mc-$side bench ops --device cuda --ops lora_linear --modes fwd,bwd \
      --shapes large --dtypes bf16,f16 --seconds 1 --json "$out/lora-$side-$round.json"
  done
done
} > "$out/run.log" 2>&1
cat "$out/gpu.txt"; grep -E "merge|sums|backward|checks" "$out/tclab-merge.txt"
grep -E "ratio|passed|failed|FAIL|exit code" "$out/run.log" | tail -40
