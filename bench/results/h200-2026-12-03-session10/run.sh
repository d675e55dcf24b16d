#!/usr/bin/env bash
# Session 10, one H200: the tensor-core LoRA kernels. The lab (bench/kernel-lab/tclab.cu: its
# checks, then each kernel against the cuBLAS call it replaces and the whole sequences against
# the bare GEMMs, interleaved); the library build's GPU tests; the LoRA ops at 8×2048×4096,
# bf16 and f16, forward and backward, of this build and of the build the session started from
# (BASE_XZ), interleaved twice; training of both builds, interleaved twice.
#   bash bench/results/h200-2026-12-03-session10/run.sh OUT BASE_XZ
out=$1; base_xz=$2; mkdir -p "$out"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
new=/tmp/mc-new; base=/tmp/mc-base
xz -dc dist/cuda/metal-candle.xz > $new; xz -dc "$base_xz" > $base; chmod +x $new $base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 200 "$@"; echo "== $name: exit code $?"; }
{
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
[ -x dist/lab/tclab ] && run "tclab" dist/lab/tclab > "$out/tclab.txt" 2>&1
run "gpu-test" $new gpu-test
for round in 1 2; do
  for side in base new; do
    exe=$new; [ $side = base ] && exe=$base
    run "lora ops $side $round" $exe bench ops --device cuda --ops lora_delta,lora_linear --modes fwd,bwd \
      --shapes large --dtypes bf16,f16 --seconds 1 --json "$out/lora-$side-$round.json"
  done
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
for f in "$out"/train-*.json; do echo "$(basename "$f" .json) $(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['tokens_per_s']))" "$f")"; done > "$out/train-tokens-per-s.txt"
cd "$out" && tar czf results.tgz --exclude results.tgz . && ls
